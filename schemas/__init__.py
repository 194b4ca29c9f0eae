"""Wire frames of the chat protocol and their exported JSON Schema."""

from schemas.frames import (
    CLIENT_MESSAGE,
    CLIENT_TYPES,
    ChatResponse,
    EndStatus,
    ErrorCode,
    Question,
    Regenerate,
    Reset,
    Step,
    StepDetail,
    StepDocument,
    Stop,
    Timings,
    Usage,
)

__all__ = [
    "CLIENT_MESSAGE",
    "CLIENT_TYPES",
    "ChatResponse",
    "EndStatus",
    "ErrorCode",
    "Question",
    "Regenerate",
    "Reset",
    "Step",
    "StepDetail",
    "StepDocument",
    "Stop",
    "Timings",
    "Usage",
]
