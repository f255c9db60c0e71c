"""Print an answer as `generate` produces it, marking the tokens that came from accepted drafts."""

import sys
from typing import TextIO

from transformers.generation.streamers import BaseStreamer


ACCEPTED_DRAFT_STYLE = "\033[32m"  # green
RESET_STYLE = "\033[0m"


class DraftMarkingStreamer(BaseStreamer):
    """
    A streamer for `model.generate(..., streamer=...)` that prints the new text as it arrives.

    Under self-speculative decoding transformers hands over one chunk per verification round: the accepted drafts
    followed by the full model's own token. With `mark_drafts`, the text of the accepted drafts is shown in colour.
    The first chunk is the prompt, which is skipped; the answer's leading space is dropped.
    """

    def __init__(self, tokenizer, mark_drafts: bool | None = None, stream: TextIO | None = None):
        self.tokenizer = tokenizer
        self.stream = stream if stream is not None else sys.stdout
        self.mark_drafts = self.stream.isatty() if mark_drafts is None else mark_drafts
        self.token_ids: list[int] = []
        self.printed_text = ""
        self.prompt_seen = False

    def put(self, value) -> None:
        chunk = value.reshape(-1).tolist()
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        drafted, own = chunk[:-1], chunk[-1:]
        self._write(drafted, ACCEPTED_DRAFT_STYLE if self.mark_drafts else "")
        self._write(own, "")

    def end(self) -> None:
        self.stream.write("\n")
        self.stream.flush()

    def _write(self, token_ids: list[int], style: str) -> None:
        if not token_ids:
            return
        self.token_ids += token_ids
        text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True).lstrip()
        new_text, self.printed_text = text[len(self.printed_text) :], text
        if new_text:
            self.stream.write(f"{style}{new_text}{RESET_STYLE}" if style else new_text)
            self.stream.flush()
