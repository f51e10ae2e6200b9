"""TextOutput: detokenize a request's generated tokens and find its stop strings.

The whole output is decoded again each time (tokenizers merge pieces across token boundaries, so
decoding token by token is not exact); a trailing U+FFFD (half a multi-byte character) is held
back from streamed deltas until the next token completes it.
"""
from __future__ import annotations

from xy_inductor.engine.request import Request


class TextOutput:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._sent: dict[str, int] = {}  # characters of text already handed out, per request

    def _text(self, request: Request, num_tokens: int) -> tuple[str, bool]:
        """The text of the first num_tokens output tokens, cut before its first stop string, and
        whether one was found."""
        params = request.sampling_params
        text = self.tokenizer.decode(request.output_token_ids[:num_tokens],
                                     skip_special_tokens=params.skip_special_tokens)
        cut = min((i for i in (text.find(stop) for stop in params.stop) if i >= 0), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def update(self, request: Request) -> tuple[str, str, bool]:
        """(text so far, text new since the last call, whether a stop string was found)."""
        text, hit = self._text(request, request.num_output_tokens)
        sent = self._sent.get(request.request_id, 0)
        visible = text if hit or request.finished or not text.endswith("\ufffd") else text[:-1]
        new_text = visible[sent:]
        self._sent[request.request_id] = max(sent, len(visible))
        return text, new_text, hit

    def first_stop(self, request: Request, num_new: int) -> int | None:
        """The fewest output tokens whose text holds a stop string, among the last `num_new`
        prefixes (a verify step appends several tokens at once: the ones after the stop go)."""
        total = request.num_output_tokens
        return next((n for n in range(max(1, total - num_new + 1), total + 1) if self._text(request, n)[1]), None)

    def drop(self, request_id: str) -> None:
        self._sent.pop(request_id, None)
