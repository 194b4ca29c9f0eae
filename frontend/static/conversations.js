// The sidebar's list of earlier conversations: searched, renamed in place, loaded a page at a
// time as it scrolls, and kept the same in every tab of the browser (a BroadcastChannel says
// what one tab renamed or deleted; a tab shown again reloads the list, for other devices').
// On a narrow screen the sidebar is a drawer that a header button opens over the chat.

const PAGE_SIZE = 30;
const MOST_PER_REQUEST = 100; // the API's own limit
const SEARCH_DELAY_MS = 200;
const CHANNEL = "chat-conversations";

/** The sentence of an API refusal (`{"detail": ...}`), or what went wrong with it. */
async function refusal(response) {
  try {
    const { detail } = await response.json();
    if (typeof detail === "string") return detail;
  } catch {
    // not JSON: say the status instead
  }
  return `The server answered HTTP ${response.status}.`;
}

export class ConversationList {
  /**
   * `api(path)`: a URL under /api/conversations; `headers()`: the request's sign-in;
   * `status`: the page's status line; `current()`: the id of the conversation shown;
   * `onOpen(id, assistant)`, `onDeleted(id)`: what the page does then.
   */
  constructor({ api, headers, status, current, onOpen, onDeleted }) {
    this.api = api;
    this.headers = headers;
    this.status = status;
    this.said = null; // what the list last put in the status line
    this.current = current;
    this.onOpen = onOpen;
    this.onDeleted = onDeleted;
    this.nav = document.getElementById("sidebar");
    this.list = document.getElementById("conversations");
    this.search = document.getElementById("search");
    this.note = document.getElementById("conversations-note");
    this.end = document.getElementById("conversations-end");
    this.items = new Map(); // id -> its <li>
    this.summaries = new Map(); // id -> its summary, as last listed
    this.query = "";
    this.nextOffset = null;
    // Every load that replaces the list takes a new number; an answer to an older one, or a
    // page asked for before it, is dropped, so a slow answer never overwrites a newer one.
    this.generation = 0;
    this.loadingMore = false;
    this.searchTimer = null;

    this.search.addEventListener("input", () => {
      clearTimeout(this.searchTimer);
      this.searchTimer = setTimeout(() => this.find(this.search.value), SEARCH_DELAY_MS);
    });
    this.search.addEventListener("keydown", (event) => {
      // Esc empties the box first (the browser does it); the page's own Esc waits for the next.
      if (event.key === "Escape" && this.search.value) event.stopPropagation();
    });
    this.observer = new IntersectionObserver(
      (entries) => {
        if (entries.some((entry) => entry.isIntersecting)) this.more();
      },
      { root: this.nav, rootMargin: "0px 0px 120px 0px" },
    );
    this.observer.observe(this.end);
    if ("BroadcastChannel" in window) {
      this.channel = new BroadcastChannel(CHANNEL);
      this.channel.addEventListener("message", (event) => this.told(event.data));
    }
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible") this.refresh();
    });
  }

  /** Say why something failed, in the page's status line. */
  say(sentence) {
    this.status.textContent = sentence;
    this.said = sentence;
  }

  /** Take back what the list said, unless something else has been said since. */
  unsay() {
    if (this.said !== null && this.status.textContent === this.said) this.status.textContent = "";
    this.said = null;
  }

  /** The last listed summary of conversation `id`, if it is loaded. */
  summary(id) {
    return this.summaries.get(id);
  }

  /** Load the list again, as far down as it was loaded (a page at least), for the same search. */
  async refresh() {
    await this.load(Math.max(PAGE_SIZE, this.items.size));
  }

  /** Show the conversations matching `text` (all of them for a blank one). */
  async find(text) {
    clearTimeout(this.searchTimer);
    const query = text.trim();
    if (query === this.query) return;
    this.query = query;
    this.nav.scrollTop = 0;
    await this.load(PAGE_SIZE);
  }

  /** One page of the list, after `offset`, for the search shown. */
  async page(offset, limit) {
    const url = new URL(this.api(""));
    url.searchParams.set("limit", String(limit));
    url.searchParams.set("offset", String(offset));
    if (this.query) url.searchParams.set("q", this.query);
    const response = await fetch(url, { headers: this.headers() });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    return response.json();
  }

  /** Replace the list with its first `count` conversations. */
  async load(count) {
    const generation = ++this.generation;
    const found = [];
    let offset = 0;
    try {
      while (offset !== null && found.length < count) {
        const limit = Math.min(MOST_PER_REQUEST, count - found.length);
        const page = await this.page(offset, limit);
        if (generation !== this.generation) return;
        found.push(...page.conversations);
        offset = page.next_offset;
      }
    } catch (error) {
      console.warn("could not load the conversation list", error);
      return;
    }
    this.nextOffset = offset;
    this.replace(found);
    this.note.textContent = this.query && !found.length ? "No conversations match." : "";
    this.watchEnd();
  }

  /** The next page, added at the end: called when the end of the list scrolls into view. */
  async more() {
    if (this.loadingMore || this.nextOffset === null) return;
    const generation = this.generation;
    this.loadingMore = true;
    try {
      const page = await this.page(this.nextOffset, PAGE_SIZE);
      if (generation !== this.generation) return; // the list was loaded again meanwhile
      this.nextOffset = page.next_offset;
      // Conversations move up as they are answered, so a page may repeat one already shown.
      for (const conversation of page.conversations) {
        if (!this.items.has(conversation.id)) this.list.append(this.itemFor(conversation));
      }
      this.markCurrent();
    } catch (error) {
      console.warn("could not load more conversations", error);
      return;
    } finally {
      this.loadingMore = false;
    }
    this.watchEnd();
  }

  /** Ask the observer again whether the end is in view: it reports changes only, and a short
   * page leaves the end where it was. */
  watchEnd() {
    this.observer.unobserve(this.end);
    this.observer.observe(this.end);
  }

  /** Make the list these conversations, in this order, keeping the items already shown (and
   * so the focus, or a rename being typed, in one of them). */
  replace(conversations) {
    const wanted = new Map();
    for (const conversation of conversations) {
      if (!wanted.has(conversation.id)) wanted.set(conversation.id, this.itemFor(conversation));
    }
    for (const [id, item] of this.items) {
      if (!wanted.has(id)) this.forget(id, item);
    }
    let at = this.list.firstElementChild;
    for (const item of wanted.values()) {
      if (item === at) at = at.nextElementSibling;
      else this.list.insertBefore(item, at);
    }
    this.items = wanted;
    this.markCurrent();
  }

  forget(id, item) {
    item.remove();
    this.items.delete(id);
    this.summaries.delete(id);
  }

  markCurrent() {
    const shown = this.current();
    for (const [id, item] of this.items) {
      const current = id === shown;
      item.classList.toggle("current", current);
      item.querySelector(".open").setAttribute("aria-current", current ? "page" : "false");
    }
  }

  /** The item of a conversation, the one shown if there is one, with its title as listed. */
  itemFor(conversation) {
    this.summaries.set(conversation.id, conversation);
    let item = this.items.get(conversation.id);
    if (!item) {
      item = this.newItem(conversation.id);
      this.items.set(conversation.id, item);
    }
    item.dataset.updated = new Date(conversation.updated).toLocaleString();
    this.retitle(item, conversation.title);
    return item;
  }

  newItem(id) {
    const item = document.createElement("li");
    item.dataset.id = id;
    const open = document.createElement("button");
    open.type = "button";
    open.className = "open";
    open.addEventListener("click", () => this.onOpen(id, this.summaries.get(id)?.assistant));
    const rename = document.createElement("button");
    rename.type = "button";
    rename.className = "rename";
    rename.textContent = "✎";
    rename.addEventListener("click", () => this.startRename(item));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "delete";
    remove.textContent = "×";
    remove.addEventListener("click", () => this.remove(item));
    item.append(open, rename, remove);
    return item;
  }

  retitle(item, title) {
    item.dataset.title = title;
    const open = item.querySelector(".open");
    open.textContent = title;
    // The whole title, which the list may cut short, and when it was last written in.
    open.title = item.dataset.updated ? `${title}\n${item.dataset.updated}` : title;
    item.querySelector(".rename").setAttribute("aria-label", `Rename “${title}”`);
    item.querySelector(".delete").setAttribute("aria-label", `Delete “${title}”`);
    const summary = this.summaries.get(item.dataset.id);
    if (summary) summary.title = title;
  }

  /** The title becomes a text box: Enter (or leaving it changed) saves, Esc cancels. */
  startRename(item) {
    if (item.querySelector(".rename-input")) return;
    const open = item.querySelector(".open");
    const box = document.createElement("input");
    box.type = "text";
    box.className = "rename-input";
    box.maxLength = 200;
    box.value = item.dataset.title;
    box.setAttribute("aria-label", `New name for “${item.dataset.title}”`);
    open.hidden = true;
    open.after(box);
    box.focus();
    box.select();

    let done = false;
    const finish = () => {
      done = true;
      box.remove();
      open.hidden = false;
    };
    const save = async (staysOnRefusal) => {
      const title = box.value.trim();
      if (title === item.dataset.title) {
        finish();
        return;
      }
      done = true; // while saving, leaving the box does not save it again
      const saved = await this.rename(item.dataset.id, box.value);
      if (saved || !staysOnRefusal || !box.isConnected) {
        const hadFocus = box === document.activeElement;
        finish();
        if (hadFocus) open.focus();
        return;
      }
      done = false;
      box.focus();
    };
    box.addEventListener("keydown", (event) => {
      if (event.isComposing) return;
      if (event.key === "Enter") {
        event.preventDefault();
        if (!done) save(true);
      } else if (event.key === "Escape") {
        // Cancels the rename only: not the reply, nor the drawer.
        event.preventDefault();
        event.stopPropagation();
        finish();
        open.focus();
      }
    });
    box.addEventListener("blur", () => {
      // Another window or tab taking the focus is not leaving the box: it gets it back.
      if (!done && document.hasFocus()) save(false);
    });
  }

  /** Rename conversation `id` on the server; the list, here and in the other tabs, follows. */
  async rename(id, title) {
    let response;
    try {
      response = await fetch(this.api(`/${id}`), {
        method: "PATCH",
        headers: { ...this.headers(), "Content-Type": "application/json" },
        body: JSON.stringify({ title }),
      });
    } catch (error) {
      this.say("Could not rename the conversation: the server did not answer.");
      return false;
    }
    if (!response.ok) {
      this.say(await refusal(response));
      if (response.status === 404) this.dropped(id);
      return false;
    }
    const renamed = await response.json();
    this.unsay();
    this.renamed(id, renamed.title);
    this.channel?.postMessage({ type: "renamed", id, title: renamed.title });
    return true;
  }

  renamed(id, title) {
    const item = this.items.get(id);
    if (item) this.retitle(item, title);
  }

  /** Delete a conversation; the focus moves on to the next one in the list. */
  async remove(item) {
    const id = item.dataset.id;
    let response;
    try {
      response = await fetch(this.api(`/${id}`), { method: "DELETE", headers: this.headers() });
    } catch (error) {
      this.say("Could not delete the conversation: the server did not answer.");
      return;
    }
    if (!response.ok && response.status !== 404) {
      this.say(`Could not delete the conversation (HTTP ${response.status}).`);
      return;
    }
    const next = item.nextElementSibling ?? item.previousElementSibling;
    const hadFocus = item.contains(document.activeElement);
    this.dropped(id);
    this.channel?.postMessage({ type: "deleted", id });
    if (hadFocus) (next?.querySelector(".open") ?? this.search).focus();
    this.onDeleted(id);
  }

  dropped(id) {
    const item = this.items.get(id);
    if (item) this.forget(id, item);
  }

  /** What another tab of this browser did to the list. */
  told(message) {
    switch (message?.type) {
      case "renamed":
        this.renamed(message.id, message.title);
        break;
      case "deleted":
        this.dropped(message.id);
        break;
      default:
        console.warn("unknown conversation list message", message);
    }
  }
}

/** The sidebar as a drawer over the chat, on screens too narrow for both side by side. */
export class Drawer {
  constructor(toggle, nav, chat) {
    this.toggle = toggle;
    this.nav = nav;
    this.chat = chat;
    this.narrow = window.matchMedia("(max-width: 640px)");
    toggle.addEventListener("click", () => {
      if (this.isOpen) this.close(toggle);
      else this.open();
    });
    // Widened past the drawer's width: the sidebar is in the page again.
    this.narrow.addEventListener("change", () => this.close());
    // A click beside the open drawer closes it.
    document.addEventListener("pointerdown", (event) => {
      if (this.isOpen && !nav.contains(event.target) && !toggle.contains(event.target)) {
        this.close();
      }
    });
  }

  get isOpen() {
    return this.toggle.getAttribute("aria-expanded") === "true";
  }

  open() {
    this.toggle.setAttribute("aria-expanded", "true");
    document.body.dataset.drawer = "open";
    // The chat behind is out of reach while the drawer covers it.
    this.chat.inert = true;
    const first = this.nav.querySelector("li.current .open") ?? this.nav.querySelector("li .open");
    (first ?? this.nav.querySelector("input")).focus();
  }

  /** Close the drawer, if open, and focus `focusTo`; false if it was not open. */
  close(focusTo = null) {
    if (!this.isOpen) return false;
    this.toggle.setAttribute("aria-expanded", "false");
    delete document.body.dataset.drawer;
    this.chat.inert = false;
    focusTo?.focus();
    return true;
  }
}
