// The chat client: renders ChatResponse frames from /chat as they arrive.
// Model output is untrusted: it is rendered as markdown and sanitised by DOMPurify before it
// reaches the DOM; everything else goes in through textContent.
//
// A conversation outlives the socket: the page keeps the conversation's id (also in the URL)
// and the last `seq` it rendered, and reconnects with `?conversation=ID&after=SEQ`, so a
// dropped connection or a server restart carries on where it was, with nothing repeated.

import { ConversationList, Drawer } from "./conversations.js";
import { ReplyView, copyText } from "./render.js";
import { StepList } from "./steps.js";
import { setUpTheme } from "./theme.js";

const messages = document.getElementById("messages");
const statusLine = document.getElementById("status");
const connection = document.getElementById("connection");
const form = document.getElementById("composer");
const input = document.getElementById("question");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const newChatButton = document.getElementById("new-chat");
const assistantPicker = document.getElementById("assistant");
const drawerToggle = document.getElementById("drawer-toggle");

const RETRY_FIRST_MS = 500;
const RETRY_MAX_MS = 8000;

let socket = null;
let retryMs = RETRY_FIRST_MS;
// Why the page moved to a new conversation on its own, said once that conversation opens.
let notice = null;
let reply = null; // { node, view, steps } while a reply streams
let editing = false; // the composer holds an edit of the last question
let followBottom = true;
// The conversation shown, and the last of its frames rendered (0: none yet).
let conversationId = new URL(location.href).searchParams.get("conversation");
let lastSeq = 0;
// The assistant that answers the conversation shown, when known (null: not known yet).
let shownAssistant = null;
// The close code of a socket whose token expired (see docs/protocol.md).
const CLOSE_UNAUTHORIZED = 4401;

// Sign-in, when the server has CHAT_AUTH=token: the token is asked for once (or taken from
// the page's URL fragment, `#token=...`) and kept in sessionStorage, never in a URL.
const TOKEN_KEY = "chat-token";
let authRequired = false;

function takeTokenFromFragment() {
  const found = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (!found) return;
  sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(found[1]));
  history.replaceState(null, "", location.pathname + location.search);
}

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

/** Say why sign-in is needed and ask for a token; false if the user gave none. */
function askForToken(why) {
  statusLine.textContent = why;
  const token = window.prompt(`${why}\nPaste your access token:`);
  if (!token || !token.trim()) {
    sessionStorage.removeItem(TOKEN_KEY);
    setConnection("closed", "Not signed in");
    return false;
  }
  sessionStorage.setItem(TOKEN_KEY, token.trim());
  return true;
}

/** A single-use ticket for the next socket, trading the token for it; null if refused. */
async function socketTicket() {
  if (!sessionStorage.getItem(TOKEN_KEY) && !askForToken("This server needs you to sign in.")) {
    return null;
  }
  const response = await fetch(new URL("api/ws-ticket", location.href), {
    method: "POST",
    headers: authHeaders(),
  });
  if (response.status === 401) {
    const detail = (await response.json()).detail;
    sessionStorage.removeItem(TOKEN_KEY);
    if (!askForToken(`Your token was refused: ${detail}`)) return null;
    return socketTicket();
  }
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  return (await response.json()).ticket;
}

/** The socket's URL, next to the page: works behind a path prefix and on https (wss). */
function socketUrl(ticket) {
  const url = new URL("chat", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  url.search = "";
  if (ticket) url.searchParams.set("ticket", ticket);
  if (conversationId) {
    url.searchParams.set("conversation", conversationId);
    if (lastSeq > 0) url.searchParams.set("after", String(lastSeq));
  } else if (assistantPicker.value) {
    url.searchParams.set("assistant", assistantPicker.value);
  }
  return url.href;
}

function apiUrl(path) {
  return new URL(`api/conversations${path}`, location.href).href;
}

/** Keep the conversation's id in the address bar once it is stored, so reloads reopen it. */
function showInUrl(id) {
  const url = new URL(location.href);
  if (id) url.searchParams.set("conversation", id);
  else url.searchParams.delete("conversation");
  if (url.href !== location.href) history.replaceState(null, "", url.href);
}

function setConnection(state, text) {
  connection.dataset.state = state;
  connection.textContent = text;
  sendButton.disabled = state !== "open";
}

function setStreaming(streaming) {
  stopButton.disabled = !streaming;
  document.body.dataset.streaming = streaming ? "true" : "false";
  updateRegenerate();
}

// Scrolling reads the layout: done once per frame, however many frames arrived in it, so a
// conversation replayed at once is laid out once rather than once per message.
let scrollQueued = false;
let scrolledTo = 0; // where the page last put the reader: see the scroll listener
function scrollToEnd() {
  if (scrollQueued || !followBottom) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    scrollNow();
  });
}

/** Scroll to the end now: for a reply's text, rendered in an animation frame already, so that
 * it is never shown for a frame before the page follows it. */
function scrollNow() {
  if (!followBottom) return;
  messages.scrollTop = messages.scrollHeight;
  scrolledTo = messages.scrollTop;
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

/** Under a finished reply: Copy (its markdown), and what it cost, from its `end` frame. */
function replyFooter(text, end) {
  const footer = document.createElement("div");
  footer.className = "reply-meta";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "copy-reply";
  copy.textContent = "Copy";
  copy.setAttribute("aria-label", "Copy the reply as markdown");
  copy.addEventListener("click", () => copyText(copy, text));
  footer.append(copy);
  const facts = [];
  const usage = end.usage;
  if (usage) {
    const about = usage.estimated ? "about " : "";
    facts.push(`${about}${usage.prompt_tokens} + ${usage.completion_tokens} tokens`);
  }
  const timings = end.timings;
  if (timings && timings.first_token_seconds != null) {
    facts.push(`first token ${timings.first_token_seconds.toFixed(2)} s`);
    const writing = timings.duration_seconds - timings.first_token_seconds;
    if (usage && usage.completion_tokens > 1 && writing > 0) {
      facts.push(`${(usage.completion_tokens / writing).toFixed(1)} tokens/s`);
    }
  }
  if (facts.length) {
    const said = document.createElement("span");
    said.className = "facts";
    said.textContent = facts.join(" · ");
    footer.append(said);
  }
  return footer;
}

/** Only the last question offers to be edited, and the last reply, once finished, to be
 * answered again. */
function updateRegenerate() {
  for (const button of messages.querySelectorAll(".edit-question")) button.remove();
  const questions = messages.querySelectorAll(".bubble.you");
  const lastQuestion = questions[questions.length - 1];
  if (lastQuestion) lastQuestion.append(editButton(lastQuestion));
  for (const row of messages.querySelectorAll(".reply-actions")) row.remove();
  const last = messages.lastElementChild;
  const finished = ".bubble.bot[data-status], .reply-meta, .bubble.error";
  if (reply || !last || !last.matches(finished)) return;
  const row = document.createElement("div");
  row.className = "reply-actions";
  const button = document.createElement("button");
  button.type = "button";
  button.className = "regenerate";
  button.textContent = "Regenerate";
  button.addEventListener("click", () => send({ type: "regenerate" }));
  row.append(button);
  append(row);
}

/** Edit: the question goes back to the composer; sending it replaces the question and its
 * reply (`regenerate` with a `message`), interrupting the reply if it still streams. */
function editButton(question) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "edit-question";
  button.setAttribute("aria-label", "Edit this question");
  button.addEventListener("click", () => {
    input.value = question.firstChild?.textContent ?? "";
    editing = true;
    form.dataset.editing = "true";
    statusLine.textContent = "Editing your last question: Enter sends it, Esc cancels.";
    input.focus();
  });
  return button;
}

function stopEditing() {
  editing = false;
  delete form.dataset.editing;
}

/** The one way a reply ends: its `end` frame. */
function finishReply(end) {
  const status = end.status;
  statusLine.textContent = "";
  if (reply) {
    reply.view.finish();
    reply.node.classList.remove("streaming");
    reply.node.removeAttribute("aria-busy");
    reply.node.dataset.status = status;
    reply.node.after(replyFooter(reply.view.text, end));
    if (status === "interrupted") {
      reply.node.classList.add("interrupted");
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "Stopped";
      reply.node.append(note);
    }
    reply = null;
  }
  setStreaming(false);
}

/** Everything after the last question: the reply a regenerated one replaces. */
function removeLastReply() {
  const questions = messages.querySelectorAll(".bubble.you");
  const lastQuestion = questions[questions.length - 1];
  while (lastQuestion && lastQuestion.nextSibling) lastQuestion.nextSibling.remove();
}

function clearView() {
  reply = null;
  messages.replaceChildren();
  statusLine.textContent = "";
  setStreaming(false);
}

/** A new reply's bubble: its steps (if it has any) above its text. */
function startReply() {
  const node = bubble("bot streaming", "");
  node.setAttribute("aria-busy", "true");
  const steps = new StepList(node);
  const view = new ReplyView(node);
  view.onRendered = scrollNow;
  return { node, view, steps };
}

/** Update the page for one frame from the server. */
function applyFrame(frame) {
  if (frame.conversation) {
    // The socket's opening frame, or a reset's acknowledgement: which conversation this is.
    if (frame.conversation !== conversationId) {
      conversationId = frame.conversation;
      lastSeq = frame.seq ?? 0;
      clearView();
      showInUrl(null);
      markCurrent();
      if (notice) bubble("error", notice).setAttribute("role", "alert");
    }
    notice = null;
    return;
  }
  if (frame.seq !== undefined) {
    if (frame.seq <= lastSeq) return; // already shown
    lastSeq = frame.seq;
  }
  switch (frame.type) {
    case "start":
      if (frame.regenerate) removeLastReply();
      reply = startReply();
      setStreaming(true);
      break;
    case "stream":
      if (frame.sender === "you") {
        if (frame.replaces !== undefined) {
          // An edit: the question it replaces goes, and everything after it.
          const old = messages.querySelector(`.bubble.you[data-seq="${frame.replaces}"]`);
          while (old && old.nextSibling) old.nextSibling.remove();
          old?.remove();
          reply = null;
        }
        bubble("you", frame.message).dataset.seq = String(frame.seq);
        showInUrl(conversationId);
        updateRegenerate();
        // A new conversation is listed as its first question is asked, not once answered.
        if (!conversations.summary(conversationId)) refreshList();
      } else if (reply) {
        reply.view.add(frame.message);
      }
      break;
    case "info":
      statusLine.textContent = frame.message;
      if (frame.step && reply) reply.steps.update(frame);
      break;
    case "error":
      bubble("error", frame.message).setAttribute("role", "alert");
      updateRegenerate();
      break;
    case "end":
      finishReply(frame);
      refreshList();
      break;
    default:
      console.warn("unknown frame type", frame);
  }
}

async function connect() {
  setConnection("connecting", "Connecting…");
  let ticket = null;
  if (authRequired) {
    try {
      ticket = await socketTicket();
    } catch (error) {
      reconnectLater();
      return;
    }
    if (ticket === null) return;
  }
  const current = new WebSocket(socketUrl(ticket));
  socket = current;
  current.addEventListener("open", () => {
    setConnection("open", "Connected");
    if (waiting) form.requestSubmit(); // the question asked while the socket was opening
  });
  current.addEventListener("message", (event) => {
    // Joined (a socket refused after its handshake is closed before any frame): the next
    // drop is retried soon again.
    retryMs = RETRY_FIRST_MS;
    applyFrame(JSON.parse(event.data));
  });
  current.addEventListener("close", (event) => {
    if (socket !== current) return; // replaced on purpose
    if (event.code === CLOSE_UNAUTHORIZED) {
      // The token expired; the conversation goes on, and is rejoined once signed in again.
      sessionStorage.removeItem(TOKEN_KEY);
      if (askForToken("Your sign-in has expired.")) connect();
      return;
    }
    if (event.code === 1008 && /conversation/i.test(event.reason)) {
      // Deleted, or never stored: start a new conversation instead of retrying this one.
      statusLine.textContent = event.reason;
      conversationId = null;
      lastSeq = 0;
      clearView();
      showInUrl(null);
      connect();
      return;
    }
    if (event.code === 1008 && /assistant/i.test(event.reason)) {
      // The assistant picked is no longer offered: a new chat with one that is, saying why.
      shownAssistant = null;
      notice = event.reason;
      loadAssistants().then(() => openConversation(null));
      return;
    }
    if (event.code === 1008) {
      // Refused for what it asked: asking again the same way would be refused again.
      setConnection("closed", event.reason || "The server refused this connection.");
      return;
    }
    reconnectLater();
  });
}

/** The conversation goes on without us: reconnect, with backoff, and carry on after `lastSeq`. */
function reconnectLater() {
  const seconds = Math.round(retryMs / 100) / 10;
  setConnection("closed", `Disconnected; retrying in ${seconds} s`);
  setTimeout(connect, retryMs);
  retryMs = Math.min(retryMs * 2, RETRY_MAX_MS);
}

/** Show another conversation (or a new one, for null, answered by the assistant picked):
 * a new socket joined to it. */
function openConversation(id, assistant = null) {
  if (socket) {
    const old = socket;
    socket = null;
    old.close();
  }
  conversationId = id;
  lastSeq = 0;
  shownAssistant = id ? assistant : assistantPicker.value || null;
  if (shownAssistant) assistantPicker.value = shownAssistant;
  clearView();
  showInUrl(id);
  markCurrent();
  connect();
}

function send(message) {
  if (!socket || socket.readyState !== WebSocket.OPEN) return false;
  socket.send(JSON.stringify(message));
  return true;
}

// The list of earlier conversations, and the drawer it is in on a narrow screen.

const drawer = new Drawer(
  drawerToggle,
  document.getElementById("sidebar"),
  document.querySelector(".chat"),
);

const conversations = new ConversationList({
  api: apiUrl,
  headers: authHeaders,
  status: statusLine,
  current: () => conversationId,
  onOpen: (id, assistant) => {
    openConversation(id, assistant);
    drawer.close(input);
  },
  onDeleted: (id) => {
    if (id === conversationId) openConversation(null);
    refreshList();
  },
});

function markCurrent() {
  conversations.markCurrent();
}

/** Load the list again; the assistant of the conversation shown, once known, is picked. */
async function refreshList() {
  await conversations.refresh();
  const shown = conversations.summary(conversationId);
  if (shown && shown.assistant && shownAssistant === null) {
    shownAssistant = shown.assistant;
    assistantPicker.value = shown.assistant;
  }
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  const text = input.value;
  if (!text.trim()) {
    waiting = false;
    return;
  }
  followBottom = true;
  const message = editing ? { type: "regenerate", message: text } : { type: "question", message: text };
  if (send(message)) {
    waiting = false;
    input.value = "";
    if (editing || statusLine.textContent === WAITING) statusLine.textContent = "";
    stopEditing();
  } else {
    // Asked while the socket opens (a new assistant's, or a reconnection): it goes once open.
    waiting = true;
    statusLine.textContent = WAITING;
  }
});

input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.requestSubmit();
  }
});

// A question that waits for the socket to open, said so in the status line.
let waiting = false;
const WAITING = "Not connected yet: your question is sent as soon as the connection opens.";

/** Stop the reply: over the socket, or, while it is reconnecting, over HTTP, so a Stop is
 * never lost (the reply runs on the server whether or not this page is connected). */
function stopReply() {
  if (send({ type: "stop" }) || !conversationId) return;
  const url = new URL(`api/chat/${conversationId}/stop`, location.href);
  fetch(url, { method: "POST", headers: authHeaders() }).catch((error) => {
    statusLine.textContent = "Could not stop the reply: the server cannot be reached.";
    console.warn("stop failed", error);
  });
}

stopButton.addEventListener("click", stopReply);

// Esc closes the drawer if it is open, or else cancels an edit, or else stops the reply,
// wherever the focus is.
document.addEventListener("keydown", (event) => {
  if (event.key !== "Escape" || event.isComposing) return;
  if (drawer.close(drawerToggle)) {
    event.preventDefault();
  } else if (editing) {
    event.preventDefault();
    stopEditing();
    input.value = "";
    statusLine.textContent = "";
  } else if (reply) {
    event.preventDefault();
    stopReply();
  }
});

newChatButton.addEventListener("click", () => {
  // The server moves this socket to a new conversation, with the same assistant; its
  // acknowledgement clears the view. Another assistant's needs a socket of its own.
  const sameAssistant = !assistantPicker.value || assistantPicker.value === shownAssistant;
  if (!sameAssistant || !send({ type: "reset" })) openConversation(null);
  input.focus();
});

// Picking an assistant begins a new chat with it.
assistantPicker.addEventListener("change", () => {
  openConversation(null);
  input.focus();
});

/** The assistants the server offers; the picker shows only when there is a choice. */
async function loadAssistants() {
  try {
    const response = await fetch(new URL("api/assistants", location.href), {
      headers: authHeaders(),
    });
    if (!response.ok) return;
    const { assistants } = await response.json();
    assistantPicker.replaceChildren(
      ...assistants.map((assistant) => {
        const option = document.createElement("option");
        option.value = assistant.name;
        option.textContent = assistant.name;
        option.title = assistant.description;
        option.selected = assistant.default;
        return option;
      }),
    );
    if (shownAssistant) assistantPicker.value = shownAssistant;
    else if (!conversationId) shownAssistant = assistantPicker.value;
    assistantPicker.parentElement.hidden = assistants.length < 2;
  } catch (error) {
    console.warn("could not load the assistants", error);
  }
}

// Follow new text only while the reader is at the bottom; scrolling up stops it. The page's
// own scrolling is reported a frame late, when more may have been added below: what stops the
// following is a move up from where the page last put the reader.
messages.addEventListener("scroll", () => {
  const below = messages.scrollHeight - messages.scrollTop - messages.clientHeight;
  followBottom = below < 40 || messages.scrollTop >= scrolledTo - 1;
});

/** Whether the server wants a token (its /healthz says), then connect. */
async function start() {
  takeTokenFromFragment();
  try {
    const health = await (await fetch(new URL("healthz", location.href))).json();
    authRequired = health.auth === "token";
  } catch (error) {
    console.warn("could not read /healthz", error);
  }
  await connect();
  loadAssistants();
  refreshList();
}

setUpTheme(document.getElementById("theme"));
setStreaming(false);
start();
input.focus();
