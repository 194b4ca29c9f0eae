// The Vercel AI SDK's `Chat` for a page without a framework, bundled for the browser test:
// `AbstractChat` with a state that calls `onChange` whenever it changes, as `useChat` re-renders.
import { AbstractChat, DefaultChatTransport } from "ai";

class State {
  constructor(onChange) {
    this.onChange = onChange;
    this._status = "ready";
    this._error = undefined;
    this._messages = [];
  }
  get status() {
    return this._status;
  }
  set status(value) {
    this._status = value;
    this.onChange();
  }
  get error() {
    return this._error;
  }
  set error(value) {
    this._error = value;
    this.onChange();
  }
  get messages() {
    return this._messages;
  }
  set messages(value) {
    this._messages = value;
    this.onChange();
  }
  pushMessage = (message) => {
    this.messages = this._messages.concat(message);
  };
  popMessage = () => {
    this.messages = this._messages.slice(0, -1);
  };
  replaceMessage = (index, message) => {
    const next = this._messages.slice();
    next[index] = message;
    this.messages = next;
  };
  snapshot = (value) => structuredClone(value);
}

export class Chat extends AbstractChat {
  constructor({ onChange, ...options }) {
    super({ ...options, state: new State(onChange) });
  }
}

globalThis.AiSdk = { Chat, DefaultChatTransport };
