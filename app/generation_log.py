"""One log line when an answer starts and one when it ends (an observer of the streaming core).

Each carries `generationId`, `conversationId`, `companyId`, the adapter, and the `requestId` of
the request that started the answer (the answer's task was created in that request, with a
copy of its context). The end adds `status`, `ttftMs`, `durationMs`, `tokens` and `errorCode`
(a failed answer's code, a cancelled one's reason). Ids, counts and codes only: never the
messages or the answer.
"""

from __future__ import annotations

import logging

from app.logs import current_request_id, log_fields
from app.streaming.observers import AnswerEnded, AnswerStarted
from app.tables import GenerationStatus

logger = logging.getLogger("chatstream.generations")

_WARNING_STATUSES = frozenset({GenerationStatus.failed, GenerationStatus.interrupted})


class GenerationLog:
    """Logs each answer's start and end (see the module docstring)."""

    def answer_started(self, event: AnswerStarted) -> None:
        logger.info(
            "generation %s started (conversation %s, adapter %s, request %s)",
            event.generation_id,
            event.conversation_id,
            event.adapter,
            current_request_id(),
            extra=log_fields(
                event="generation.start",
                generationId=str(event.generation_id),
                conversationId=str(event.conversation_id),
                companyId=str(event.company_id) if event.company_id else None,
                adapter=event.adapter,
            ),
        )

    def answer_ended(self, event: AnswerEnded) -> None:
        status = event.status.value
        duration_ms = round(event.duration_s * 1000, 1)
        logger.log(
            logging.WARNING if event.status in _WARNING_STATUSES else logging.INFO,
            "generation %s %s%s: first token %s ms, %d tokens, %.0f ms (conversation %s, request %s)",
            event.generation_id,
            status,
            f" ({event.error_code})" if event.error_code else "",
            "-" if event.ttft_ms is None else event.ttft_ms,
            event.tokens,
            duration_ms,
            event.conversation_id,
            current_request_id(),
            extra={
                "event": "generation.end",
                "generationId": str(event.generation_id),
                "conversationId": str(event.conversation_id),
                "companyId": str(event.company_id) if event.company_id else None,
                "adapter": event.adapter,
                "status": status,
                "ttftMs": event.ttft_ms,
                "durationMs": duration_ms,
                "tokens": event.tokens,
                "errorCode": event.error_code,
            },
        )
