// The chat client: renders ChatResponse frames from /chat as they arrive.
// Model output is untrusted: it is rendered as markdown and sanitised by DOMPurify before it
// reaches the DOM; everything else goes in through textContent.

import markdownit from "./vendor/markdown-it.mjs";
import DOMPurify from "./vendor/purify.mjs";

const markdown = markdownit({ html: false, linkify: true, breaks: true });

const messages = document.getElementById("messages");
const statusLine = document.getElementById("status");
const connection = document.getElementById("connection");
const form = document.getElementById("composer");
const input = document.getElementById("question");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const newChatButton = document.getElementById("new-chat");

const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 8000;

let socket = null;
let retryMs = RETRY_FIRST_MS;
let reply = null; // { node, text } while a reply streams
let renderQueued = false;
let followBottom = true;
let wasConnected = false;

/** The socket's URL, next to the page: works behind a path prefix and on https (wss). */
function socketUrl() {
  const url = new URL("chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  return url.href;
}

function setConnection(state, text) {
  connection.dataset.state = state;
  connection.textContent = text;
  sendButton.disabled = state !== "open";
}

function setStreaming(streaming) {
  stopButton.disabled = !streaming;
  document.body.dataset.streaming = streaming ? "true" : "false";
}

function scrollToEnd() {
  if (followBottom) messages.scrollTop = messages.scrollHeight;
}

function append(node) {
  messages.append(node);
  scrollToEnd();
  return node;
}

function bubble(kind, text) {
  const node = document.createElement("div");
  node.className = `bubble ${kind}`;
  node.textContent = text;
  return append(node);
}

function notice(text) {
  const node = document.createElement("p");
  node.className = "info";
  node.textContent = text;
  return node;
}

function renderMarkdown(node, text) {
  node.innerHTML = DOMPurify.sanitize(markdown.render(text));
}

/** Re-render the streaming reply at most once per frame. */
function queueRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => {
    renderQueued = false;
    if (reply) {
      renderMarkdown(reply.node, reply.text);
      scrollToEnd();
    }
  });
}

/** The one way a reply ends, whether by its `end` frame or by a lost connection. */
function finishReply(status) {
  setStreaming(false);
  statusLine.textContent = "";
  if (!reply) return;
  renderMarkdown(reply.node, reply.text);
  reply.node.classList.remove("streaming");
  reply.node.removeAttribute("aria-busy");
  reply.node.dataset.status = status;
  if (status === "interrupted") {
    reply.node.classList.add("interrupted");
    const note = document.createElement("span");
    note.className = "note";
    note.textContent = "Stopped";
    reply.node.append(note);
  }
  reply = null;
}

/** Update the page for one frame from the server. */
function applyFrame(frame) {
  switch (frame.type) {
    case "start":
      reply = { node: bubble("bot streaming", ""), text: "" };
      reply.node.setAttribute("aria-busy", "true");
      setStreaming(true);
      break;
    case "stream":
      if (frame.sender === "you") {
        bubble("you", frame.message);
      } else if (reply) {
        reply.text += frame.message;
        queueRender();
      }
      break;
    case "info":
      statusLine.textContent = frame.message;
      break;
    case "error":
      bubble("error", frame.message).setAttribute("role", "alert");
      break;
    case "end":
      finishReply(frame.status);
      break;
    default:
      console.warn("unknown frame type", frame);
  }
}

function connect() {
  setConnection("connecting", "Connecting…");
  socket = new WebSocket(socketUrl());
  socket.addEventListener("open", () => {
    retryMs = RETRY_FIRST_MS;
    setConnection("open", "Connected");
    // The server keeps a conversation per connection: say so when a new one begins.
    if (wasConnected && messages.childElementCount > 0) {
      append(notice("Reconnected. The messages above are not part of the new conversation."));
    }
    wasConnected = true;
  });
  socket.addEventListener("message", (event) => applyFrame(JSON.parse(event.data)));
  socket.addEventListener("close", () => {
    finishReply("interrupted");
    const seconds = Math.round(retryMs / 100) / 10;
    setConnection("closed", `Disconnected; retrying in ${seconds} s`);
    setTimeout(connect, retryMs);
    retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
  });
}

function send(message) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return false;
  socket.send(JSON.stringify(message));
  return true;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value;
  if (!text.trim()) return;
  followBottom = true;
  if (send({ type: "question", message: text })) input.value = "";
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

stopButton.addEventListener("click", () => send({ type: "stop" }));

newChatButton.addEventListener("click", () => {
  if (send({ type: "reset" })) {
    reply = null;
    messages.replaceChildren();
    setStreaming(false);
  }
  input.focus();
});

// Follow new text only while the reader is at the bottom; scrolling up stops it.
messages.addEventListener("scroll", () => {
  followBottom = messages.scrollHeight - messages.scrollTop - messages.clientHeight < 40;
});

setStreaming(false);
connect();
input.focus();
