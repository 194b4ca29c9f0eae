// Drives chats made with the real Vercel AI SDK against the chat server, for the tests: one
// JSON command per line on stdin, one JSON answer per line on stdout. The SDK is the package
// named by the first argument, as pinned in frontend/package.json: `ai` (the current major)
// or an alias of an earlier major, such as `ai6`.
//
//   {"op": "new", "chat": NAME, "id": CHAT_ID, "api": URL, "headers": {...}, "messages": [...]}
//   {"op": "send", "chat": NAME, "text": TEXT, "wait": BOOL}   sendMessage
//   {"op": "regenerate", "chat": NAME}                          regenerate
//   {"op": "edit", "chat": NAME, "index": I, "text": TEXT}      sendMessage with the messageId
//                                                               of the I-th user message
//   {"op": "wait_text", "chat": NAME, "chars": N}               until the reply has N chars
//   {"op": "abort", "chat": NAME}                               the SDK's stop(): drops the request
//   {"op": "stop", "chat": NAME}                                our stop request, then stop()
//   {"op": "resume", "chat": NAME}                              resumeStream (reconnectToStream)
//   {"op": "settle", "chat": NAME}                              until the request in flight ends
//   {"op": "state", "chat": NAME}                               status, error, messages
//
// Every answer carries the chat's state: {"status", "error", "messages", "data"}.
import { readFileSync } from "node:fs";
import { createInterface } from "node:readline";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

// Found through the package's own `exports`, as a bundler would: majors lay out `dist` apart.
const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..", "frontend", "node_modules", process.argv[2] ?? "ai");
const manifest = JSON.parse(readFileSync(join(root, "package.json"), "utf8"));
const sdk = join(root, manifest.exports["."].import);
const { AbstractChat, DefaultChatTransport } = await import(pathToFileURL(sdk).href);

class State {
  constructor(messages = []) {
    this.status = "ready";
    this.error = undefined;
    this.messages = messages;
  }
  pushMessage = (message) => {
    this.messages = this.messages.concat(message);
  };
  popMessage = () => {
    this.messages = this.messages.slice(0, -1);
  };
  replaceMessage = (index, message) => {
    this.messages = [...this.messages.slice(0, index), message, ...this.messages.slice(index + 1)];
  };
  snapshot = (value) => structuredClone(value);
}

class Chat extends AbstractChat {
  constructor(options) {
    const state = new State(options.messages);
    super({ ...options, state });
    this.data = [];
  }
}

const chats = new Map();
const pending = new Map(); // chat name -> the promise of its request in flight

function view(chat) {
  return {
    status: chat.status,
    error: chat.error ? String(chat.error.message) : null,
    messages: chat.messages,
    data: chat.data,
  };
}

function replyText(chat) {
  const last = chat.messages[chat.messages.length - 1];
  if (!last || last.role !== "assistant") return "";
  return last.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
}

async function until(condition, within = 10000) {
  const deadline = Date.now() + within;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("timed out waiting");
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

function track(name, promise) {
  const settled = promise.catch(() => {});
  pending.set(name, settled);
  return settled;
}

async function run(command) {
  const { op, chat: name } = command;
  if (op === "new") {
    const transport = new DefaultChatTransport({ api: command.api, headers: command.headers });
    const chat = new Chat({
      id: command.id,
      messages: command.messages,
      transport,
      onData: (part) => chat.data.push(part),
    });
    chats.set(name, chat);
    return view(chat);
  }
  const chat = chats.get(name);
  if (!chat) throw new Error(`no chat ${name}`);
  if (op === "send") {
    const request = track(name, chat.sendMessage({ text: command.text }));
    if (command.wait) await request;
    else await until(() => chat.status !== "ready");
  } else if (op === "regenerate") {
    await track(name, chat.regenerate());
  } else if (op === "edit") {
    const questions = chat.messages.filter((message) => message.role === "user");
    const messageId = questions.at(command.index).id;
    await track(name, chat.sendMessage({ text: command.text, messageId }));
  } else if (op === "wait_text") {
    await until(() => replyText(chat).length >= command.chars);
  } else if (op === "abort") {
    await chat.stop();
  } else if (op === "stop") {
    const url = `${chat.transport.api}/${encodeURIComponent(chat.id)}/stop`;
    const answer = await fetch(url, { method: "POST", headers: chat.transport.headers });
    await chat.stop();
    return { ...view(chat), stopped: await answer.json() };
  } else if (op === "resume") {
    await track(name, chat.resumeStream());
  } else if (op === "settle") {
    await (pending.get(name) ?? Promise.resolve());
  } else if (op !== "state") {
    throw new Error(`unknown op ${op}`);
  }
  return view(chat);
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  let answer;
  try {
    answer = { ok: true, ...(await run(JSON.parse(line))) };
  } catch (error) {
    answer = { ok: false, failure: String(error && error.stack ? error.stack : error) };
  }
  process.stdout.write(JSON.stringify(answer) + "\n");
}
