// The WebSocket clients of bench/scale_status.py: one process holding every socket.
// Reads one JSON plan on the first line of stdin:
//   {"sockets": [{"url": "ws://…/ws/status", "token": "…", "conversation": "…", "local": "127.0.0.2"}, …]}
// opens them all (200 at a time; `local` spreads them over loopback addresses, as agents
// come from many addresses), subscribes each to its conversation, prints "ready <n>".
// Then, per command line on stdin:
//   "count"  -> prints "count <frames received>"
//   "dump"   -> prints one line per status frame received since the last dump:
//               "<socket> <message_id> <status> <arrival − occurred_at, ms>", then "end"
// Every socket answers the hub's heartbeat (a ping every heartbeat_s). Frames are only
// parsed and kept in memory (bounded by what one rate step sends); nothing else is done.
import WebSocket from "ws";
import { createInterface } from "node:readline";

const now = () => performance.timeOrigin + performance.now();
const lines = createInterface({ input: process.stdin });
const queue = [];
let wake = null;
lines.on("line", (line) => { queue.push(line); if (wake) { wake(); wake = null; } });
async function nextLine() {
  while (!queue.length) await new Promise((resolve) => { wake = resolve; });
  return queue.shift();
}

let frames = [];
let received = 0;
let closed = 0;
function onStatus(index, frame) {
  received++;
  frames.push(`${index} ${frame.message_id} ${frame.status} ${(now() - Date.parse(frame.occurred_at)).toFixed(1)}`);
}

function open(index, spec) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(`${spec.url}?access_token=${spec.token}`, {
      perMessageDeflate: false,
      localAddress: spec.local,
    });
    let pinger = null;
    ws.on("message", (data) => {
      const frame = JSON.parse(data);
      if (frame.type === "status") onStatus(index, frame);
      else if (frame.type === "batch") for (const f of frame.frames) onStatus(index, f);
      else if (frame.type === "connected") {
        const every = frame.heartbeat_s * 1000;
        setTimeout(() => { pinger = setInterval(() => ws.send('{"type":"ping","ts":0}'), every); }, Math.random() * every);
        ws.send(JSON.stringify({ type: "subscribe", conversation_id: spec.conversation }));
      } else if (frame.type === "subscribed") resolve();
      else if (frame.type === "error") reject(new Error(`socket ${index}: ${data}`));
    });
    ws.on("error", reject);
    ws.on("close", () => { closed++; if (pinger) clearInterval(pinger); });
  });
}

const plan = JSON.parse(await nextLine());
for (let i = 0; i < plan.sockets.length; i += 200) {
  await Promise.all(plan.sockets.slice(i, i + 200).map((spec, j) => open(i + j, spec)));
}
console.log(`ready ${plan.sockets.length}`);
for (;;) {
  const command = await nextLine();
  if (command === "count") console.log(`count ${received} closed ${closed}`);
  else if (command === "dump") {
    const out = frames;
    frames = [];
    for (let i = 0; i < out.length; i += 5000) process.stdout.write(out.slice(i, i + 5000).join("\n") + "\n");
    console.log("end");
  } else if (command === "quit") process.exit(0);
}
