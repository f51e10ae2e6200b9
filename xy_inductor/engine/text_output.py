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

    def update(self, request: Request) -> tuple[str, str, bool]:
        """(text so far, text new since the last call, whether a stop string was found)."""
        params = request.sampling_params
        text = self.tokenizer.decode(request.output_token_ids, skip_special_tokens=params.skip_special_tokens)
        hit = False
        cut = len(text)
        for stop in params.stop:
            i = text.find(stop)
            if 0 <= i < cut:
                cut, hit = i, True
        text = text[:cut]
        sent = self._sent.get(request.request_id, 0)
        visible = text if hit or request.finished or not text.endswith("\ufffd") else text[:-1]
        new_text = visible[sent:]
        self._sent[request.request_id] = max(sent, len(visible))
        return text, new_text, hit

    def first_stop(self, request: Request, num_new: int) -> int | None:
        """The fewest output tokens whose text holds a stop string, among the last `num_new`
        prefixes (a verify step appends several tokens at once: the ones after the stop go)."""
        params, ids = request.sampling_params, request.output_token_ids
        for n in range(max(1, len(ids) - num_new + 1), len(ids) + 1):
            text = self.tokenizer.decode(ids[:n], skip_special_tokens=params.skip_special_tokens)
            if any(stop in text for stop in params.stop):
                return n
        return None

    def drop(self, request_id: str) -> None:
        self._sent.pop(request_id, None)
