// Mounts the docs' React example (copied next to this file as `example.tsx`, verbatim) as an
// app would: with the chat's stored messages, so a reloaded page shows them and resumes.
import type { UIMessage } from "ai";
import { createRoot } from "react-dom/client";
import { Chat } from "./example";

async function mount(): Promise<void> {
  const id = new URLSearchParams(location.search).get("chat") ?? "";
  const stored = await fetch(`/api/chat/${encodeURIComponent(id)}`);
  const initial: UIMessage[] = stored.ok ? (await stored.json()).messages : [];
  createRoot(document.getElementById("root") as HTMLElement).render(
    <Chat id={id} initial={initial} />,
  );
}

mount();
