"""Media on an object store: Meta's limits (`limits`, pure), the store port and the
checks of an upload (`store`, pure), and its adapters: a directory under the data dir
(`local`, the embedded default) and an S3-compatible server (`s3`)."""
