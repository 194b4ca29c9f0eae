"""Ask the docs: answers questions about a folder of Markdown files, from its sections.

`CHAT_CHAIN=examples.docs:chain make run` serves it (the embedded model will do). It searches
this repository's README and docs unless `DOCS_FOLDER` names another folder. A follow-up
question is first rewritten to stand alone, silently (a model run tagged `nostream`); the
sections found are shown as the retrieval step, and the answer is asked to cite them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import bm25s
from langchain_core.callbacks import CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import Runnable, RunnableLambda
from pydantic import ConfigDict

REPOSITORY = Path(__file__).resolve().parent.parent
CONDENSE = (
    "Rewrite the user's last question so that it can be understood without the conversation "
    "before it. Reply with the rewritten question only."
)
ANSWER = (
    "Answer the question from these excerpts of the documentation, briefly. Refer to the "
    "excerpts you used by their numbers, like [1].\n\n{excerpts}"
)
EXCERPT_CHARS = 1200
# A rewrite longer than this is a model answering instead of rewriting (a small one does):
# the last two questions are searched for instead.
LONGEST_REWRITE = 300


def markdown_files(folder: Path | None) -> list[Path]:
    """The Markdown files under `folder`; for None, this repository's README and docs."""
    if folder is None:
        return [REPOSITORY / "README.md", *sorted((REPOSITORY / "docs").rglob("*.md"))]
    return sorted(
        path
        for path in folder.rglob("*.md")
        if not any(part.startswith(".") or part == "node_modules" for part in path.parts)
    )


def sections(path: Path, source: str) -> list[Document]:
    """A Markdown file cut at its headings (not at `#` lines inside code): a document per
    section, titled by its heading."""
    documents: list[Document] = []
    lines: list[str] = []
    title, fenced = source, False

    def close() -> None:
        if any(line.strip() for line in lines[1:]) or (lines and not lines[0].startswith("#")):
            body = "\n".join(lines)
            documents.append(Document(body, metadata={"title": title, "source": source}))

    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,3} ", line):
            close()
            title, lines = line.lstrip("#").strip(), []
        lines.append(line)
    close()
    return documents


class SectionRetriever(BaseRetriever):
    """BM25 over the sections of a folder of Markdown files."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    documents: list[Document]
    index: Any
    k: int = 3

    @classmethod
    def of(cls, folder: Path | None) -> SectionRetriever:
        """An index of the sections of `folder` (None: this repository's docs)."""
        base = folder or REPOSITORY
        if folder is not None and not folder.is_dir():
            raise ValueError(f"DOCS_FOLDER {str(folder)!r} is not a folder")
        documents = [
            document
            for path in markdown_files(folder)
            for document in sections(path, str(path.relative_to(base)))
        ]
        if not documents:
            raise ValueError(f"DOCS_FOLDER {str(folder)!r} holds no Markdown (.md) file")
        index = bm25s.BM25()
        texts = [document.page_content for document in documents]
        index.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        return cls(documents=documents, index=index)

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun
    ) -> list[Document]:
        tokens = bm25s.tokenize([query], stopwords="en", show_progress=False)
        found, scores = self.index.retrieve(
            tokens, k=min(self.k, len(self.documents)), show_progress=False
        )
        return [
            self.documents[i] for i, score in zip(found[0], scores[0], strict=True) if score > 0
        ]


def chain(model: BaseChatModel) -> Runnable[Any, Any]:
    """Answers questions about this project's documentation, citing the sections it used."""
    folder = os.environ.get("DOCS_FOLDER")
    retriever = SectionRetriever.of(Path(folder) if folder else None)
    condense = model.with_config(run_name="condense", tags=["nostream"])

    async def answer(state: dict[str, Any]) -> dict[str, Any]:
        messages: list[BaseMessage] = state["messages"]
        question = str(messages[-1].content)
        if len(messages) > 1:  # a follow-up: made to stand alone first
            rewritten = (await condense.ainvoke([SystemMessage(CONDENSE), *messages])).text.strip()
            if rewritten and len(rewritten) <= LONGEST_REWRITE:
                question = rewritten
            else:
                earlier = [m for m in messages[:-1] if isinstance(m, HumanMessage)]
                question = f"{earlier[-1].content if earlier else ''} {question}".strip()
        documents = await retriever.ainvoke(question)
        excerpts = "\n\n".join(
            f"[{number}] {document.metadata['title']} ({document.metadata['source']}):\n"
            f"{document.page_content[:EXCERPT_CHARS]}"
            for number, document in enumerate(documents, 1)
        )
        prompt = [SystemMessage(ANSWER.format(excerpts=excerpts)), HumanMessage(question)]
        return {"messages": [*messages, await model.ainvoke(prompt)]}

    return RunnableLambda(answer, name="docs")
