"""The assistants a server offers: its built-in chain, and the user's chains by import string.

`CHAT_CHAIN=package.module:attribute` names a LangChain `Runnable` (an LCEL chain, a
`create_agent` agent, a compiled LangGraph graph), or a factory that is given the configured
chat model and returns one, as uvicorn takes an app. `CHAT_CHAINS=name=module:attr,...` offers
more; each conversation is answered by the one it was opened with.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.runnables import Runnable

from backend.config.settings import Settings
from backend.model.chain import Chain, RunnableChain

# The built-in chain's name.
BUILT_IN = "chat"
BUILT_IN_DESCRIPTION = "The server's own chat: the system prompt, the conversation, the model."
NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


class UnknownAssistant(ValueError):
    """A request names an assistant the server does not offer, or not the one its
    conversation is answered by."""


class ChainImportError(Exception):
    """A chain that cannot be imported or built: the server does not start without it."""

    def __init__(self, spec: str, reason: str) -> None:
        super().__init__(f"cannot serve the chain {spec!r}: {reason}")


@dataclass(frozen=True)
class Assistant:
    """One chain the server offers, under a name."""

    name: str
    description: str
    chain: Chain


def resolve(spec: str) -> Any:
    """The object `package.module:attribute` names (the attribute may be dotted)."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ChainImportError(spec, "expected package.module:attribute")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ChainImportError(spec, f"the module cannot be imported ({exc})") from exc
    except Exception as exc:  # the user's module failed while it was imported
        raise ChainImportError(spec, f"importing it failed: {type(exc).__name__}: {exc}") from exc
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ChainImportError(spec, f"{module_name} has no attribute {attribute!r}") from exc
    return target


def build(spec: str, model: BaseChatModel) -> tuple[Runnable[Any, Any], str]:
    """The runnable `spec` names (a factory is called with `model`), and its description."""
    target = resolve(spec)
    if isinstance(target, Runnable):
        runnable = target
    elif callable(target):
        try:
            runnable = target(model)
        except Exception as exc:
            raise ChainImportError(
                spec, f"its factory failed: {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(runnable, Runnable):
            raise ChainImportError(
                spec, f"its factory returned {type(runnable).__name__}, not a LangChain Runnable"
            )
    else:
        kind = type(target).__name__
        raise ChainImportError(
            spec,
            f"it is {'an' if kind[0] in 'aeiouAEIOU' else 'a'} {kind}, not a LangChain Runnable "
            "or a factory of one",
        )
    return runnable, description_of(spec, target)


def description_of(spec: str, target: Any) -> str:
    """What an assistant says of itself: its `description`, its factory's docstring, or its
    module's, first paragraph; else its import string."""
    given = getattr(target, "description", None)
    if isinstance(given, str) and given.strip():
        return given.strip()
    documented = [inspect.getdoc(target)] if inspect.isfunction(target) else []
    documented.append(inspect.getdoc(importlib.import_module(spec.partition(":")[0])))
    for doc in documented:
        if doc:
            return " ".join(doc.split("\n\n", 1)[0].split())
    return spec


def named(entries: Sequence[str]) -> list[tuple[str, str]]:
    """`CHAT_CHAINS` entries, `name=module:attr`, as (name, spec) pairs."""
    pairs = []
    for entry in entries:
        name, equals, spec = entry.partition("=")
        name = name.strip()
        if not equals or not NAME.fullmatch(name):
            raise ChainImportError(
                entry,
                "expected name=package.module:attribute, the name up to 32 of a-z, 0-9, _ and -",
            )
        pairs.append((name, spec.strip()))
    return pairs


def default_name(spec: str) -> str:
    """The name a chain given by import string alone is offered under: its module's last part."""
    last = spec.partition(":")[0].rsplit(".", 1)[-1].lower().replace("_", "-")
    return last if NAME.fullmatch(last) and last != BUILT_IN else "custom"


class Assistants:
    """Every assistant of the server, and which answers a conversation that names none."""

    def __init__(self, assistants: Sequence[Assistant], default: str) -> None:
        self.by_name = {assistant.name: assistant for assistant in assistants}
        self.default = self.by_name[default]

    @classmethod
    def only(cls, chain: Chain) -> Assistants:
        """The built-in assistant alone, answering with `chain`."""
        return cls([Assistant(BUILT_IN, BUILT_IN_DESCRIPTION, chain)], BUILT_IN)

    @property
    def names(self) -> list[str]:
        return list(self.by_name)

    def answering(self, assistant: str | None) -> str:
        """The name of the assistant a conversation that names `assistant` is answered by."""
        return self.default.name if assistant is None else assistant

    def __iter__(self) -> Any:
        return iter(self.by_name.values())

    def get(self, name: str | None) -> Assistant:
        """The assistant called `name` (the default for None); `KeyError` if there is none."""
        return self.default if name is None else self.by_name[name]

    def check(self, wanted: str | None, answering: str | None = None) -> str | None:
        """`wanted`, an assistant a request names (None: none), if the server offers it and,
        for a request about a conversation answered by `answering` (its name; the default's
        for one that names none), it is that one; `UnknownAssistant` with a sentence
        otherwise."""
        if wanted is None:
            return None
        if wanted not in self.by_name:
            raise UnknownAssistant(
                f"No assistant {wanted[:32]!r}; this server offers {', '.join(self.names)}."
            )
        if answering is not None and answering != wanted:
            raise UnknownAssistant(
                f"This conversation is answered by {answering!r}; begin a new one to ask "
                f"{wanted!r}."
            )
        return wanted


def offered(settings: Settings) -> tuple[list[tuple[str, str]], str]:
    """The chains `settings` name, as (name, import string) pairs, and the default's name."""
    pairs = named(settings.chat_chains)
    default = settings.chat_chain or BUILT_IN
    if ":" in default:
        pairs.append((default_name(default), default))
        default = default_name(default)
    return pairs, default


def check_importable(settings: Settings) -> None:
    """Import every chain `settings` name, without building them: `ChainImportError` for the
    first that cannot be (a parent of several workers checks before it starts them)."""
    for _, spec in offered(settings)[0]:
        resolve(spec)


def load_assistants(settings: Settings, model: BaseChatModel, built_in: Chain) -> Assistants:
    """The assistants `settings` offer, each chain imported and built now: one that cannot be
    raises `ChainImportError`, naming it and why."""
    assistants = [Assistant(BUILT_IN, BUILT_IN_DESCRIPTION, built_in)]
    pairs, default = offered(settings)
    for name, spec in pairs:
        if name == BUILT_IN:
            raise ChainImportError(spec, f"the name {BUILT_IN!r} is the built-in chain's")
        if name in {assistant.name for assistant in assistants}:
            raise ChainImportError(spec, f"the name {name!r} is taken twice")
        runnable, description = build(spec, model)
        assistants.append(Assistant(name, description, RunnableChain(runnable)))
    names = [assistant.name for assistant in assistants]
    if default not in names:
        raise ChainImportError(
            default,
            f"expected package.module:attribute, or the name of an assistant ({', '.join(names)})",
        )
    return Assistants(assistants, default)
