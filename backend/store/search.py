"""Finding conversations by the words of their titles, questions and replies.

A search is words; a conversation matches when its title, or one of its finished turns
(question and reply together), has a word starting with each of them, in any case. The
indexes are migration 0006's: FTS5 on SQLite, `to_tsvector('simple', ...)` on PostgreSQL.
"""

from __future__ import annotations

import re

from sqlalchemy import TextClause, text

# Words past these are not looked for: a search box is a few words, not a document.
MAX_WORDS = 16
MAX_WORD = 64
WORD = re.compile(r"\w+")


def words_of(query: str) -> list[str]:
    """The words of a search, lowercased, each once, in order."""
    found = dict.fromkeys(word[:MAX_WORD].lower() for word in WORD.findall(query))
    return list(found)[:MAX_WORDS]


def matching(dialect: str, words: list[str]) -> TextClause:
    """Where a `conversations` row matches every word, in the terms `dialect`'s index is
    built on (an expression index is used only for the very same expression)."""
    if dialect == "sqlite":
        # Quoted, each word is a word to FTS5, never an operator; `*` makes it a prefix.
        return text(
            "(conversations.rowid IN "
            "(SELECT rowid FROM search_titles WHERE search_titles MATCH :search) "
            "OR conversations.id IN (SELECT conversation_id FROM turns WHERE rowid IN "
            "(SELECT rowid FROM search_turns WHERE search_turns MATCH :search)))"
        ).bindparams(search=" AND ".join(f'"{word}"*' for word in words))
    return text(
        "(conversations.id IN (SELECT id FROM conversations WHERE "
        "to_tsvector('simple', title) @@ to_tsquery('simple', :search)) "
        "OR conversations.id IN (SELECT conversation_id FROM turns WHERE status IS NOT NULL "
        "AND to_tsvector('simple', question || ' ' || text) @@ to_tsquery('simple', :search)))"
    ).bindparams(search=" & ".join(f"'{word}':*" for word in words))
