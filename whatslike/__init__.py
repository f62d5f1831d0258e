"""Whatslike: outbound WhatsApp and Instagram messages whose statuses reach agents live."""

__version__ = "0.1.0"
