// The steps of a reply (tool calls, searches, graph nodes: `info` frames with a `step`), shown
// as one compact line at the top of the reply that opens into the list of them.

/** What a step's line says: the frame's own sentence, and the documents a search found. */
function describe(frame) {
  const step = frame.step;
  const documents = step.detail?.documents ?? [];
  const names = documents.map((document) => document.title || document.source).filter(Boolean);
  return names.length ? `${frame.message}: ${names.join(", ")}` : frame.message;
}

export class StepList {
  /** `bubble`: the reply the steps belong to; nothing is added until a step comes. */
  constructor(bubble) {
    this.bubble = bubble;
    this.details = null;
    this.summary = null;
    this.list = null;
    this.items = new Map(); // step id -> its line
  }

  update(frame) {
    if (!this.details) this.create();
    const step = frame.step;
    let item = this.items.get(step.id);
    if (!item) {
      item = document.createElement("li");
      this.items.set(step.id, item);
      this.list.append(item);
    }
    item.dataset.status = step.status;
    item.dataset.kind = step.kind;
    item.dataset.message = frame.message;
    item.textContent = describe(frame);
    this.summarise();
  }

  /** One line for all of them: how many, and the latest; tool calls and searches count,
   * graph nodes only when there is nothing else. */
  summarise() {
    const lines = [...this.items.values()];
    const actions = lines.filter((line) => line.dataset.kind !== "chain");
    const counted = actions.length ? actions : lines;
    const latest = counted[counted.length - 1];
    const noun = counted.length === 1 ? "step" : "steps";
    const running = latest.dataset.status === "started";
    this.summary.textContent = running
      ? `${latest.dataset.message}…`
      : `${counted.length} ${noun}: ${latest.dataset.message}`;
  }

  create() {
    this.details = document.createElement("details");
    this.details.className = "steps";
    this.summary = document.createElement("summary");
    this.list = document.createElement("ul");
    this.details.append(this.summary, this.list);
    this.bubble.prepend(this.details);
  }
}
