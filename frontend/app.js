// A small client for /chat: renders ChatResponse frames as they arrive. Text goes in through
// textContent only: model output is never parsed as HTML.

const messages = document.getElementById("messages");
const form = document.getElementById("composer");
const input = document.getElementById("question");
const stopButton = document.getElementById("stop");
const connection = document.getElementById("connection");

let socket = null;
let current = null;
let retryDelay = 500;

function socketUrl() {
  const url = new URL("chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function bubble(kind, text) {
  const node = document.createElement("div");
  node.className = `bubble ${kind}`;
  node.textContent = text;
  messages.append(node);
  messages.scrollTop = messages.scrollHeight;
  return node;
}

function render(frame) {
  switch (frame.type) {
    case "start":
      current = bubble("bot", "");
      stopButton.disabled = false;
      break;
    case "stream":
      if (frame.sender === "you") bubble("you", frame.message);
      else if (current) current.textContent += frame.message;
      messages.scrollTop = messages.scrollHeight;
      break;
    case "info":
      bubble("info", frame.message);
      break;
    case "error":
      bubble("error", frame.message);
      break;
    case "end":
      if (current && frame.status === "interrupted") current.classList.add("interrupted");
      current = null;
      stopButton.disabled = true;
      break;
    default:
      console.warn("unknown frame", frame);
  }
}

function connect() {
  socket = new WebSocket(socketUrl());
  socket.addEventListener("open", () => {
    connection.textContent = "connected";
    retryDelay = 500;
  });
  socket.addEventListener("message", (event) => render(JSON.parse(event.data)));
  socket.addEventListener("close", () => {
    connection.textContent = "disconnected, retrying…";
    stopButton.disabled = true;
    setTimeout(connect, retryDelay);
    retryDelay = Math.min(retryDelay * 2, 10000);
  });
}

function send(message) {
  if (socket && socket.readyState === WebSocket.OPEN) socket.send(JSON.stringify(message));
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value;
  if (!text.trim()) return;
  send({ type: "question", message: text });
  input.value = "";
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    form.requestSubmit();
  }
});

stopButton.addEventListener("click", () => send({ type: "stop" }));

connect();
