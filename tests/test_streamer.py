"""The program's streamer prints exactly the generated text and marks what accepted drafts contributed."""

import io

import torch

from tiny_models import pixel_values, prompt_ids, twig_copy_of_deep_layers
from twigvlm import output_cache
from twigvlm.app.streamer import ACCEPTED_DRAFT_STYLE, RESET_STYLE, DraftMarkingStreamer


class WordTokenizer:
    """Token i is the word "w{i}"; enough to check what the streamer prints."""

    def decode(self, token_ids, skip_special_tokens=True):
        return "".join(f" w{token_id}" for token_id in token_ids)


def test_streamed_text_is_the_answer_with_drafts_marked():
    model = twig_copy_of_deep_layers(noise=0.06)
    ids = prompt_ids()
    kwargs = dict(input_ids=ids, pixel_values=pixel_values(), max_new_tokens=15, do_sample=False)
    kwargs.update(speculative_decoding=True, assistant_confidence_threshold=0.0)

    plain, marked = io.StringIO(), io.StringIO()
    out = model.generate(**kwargs, streamer=DraftMarkingStreamer(WordTokenizer(), mark_drafts=False, stream=plain))
    model.generate(**kwargs, streamer=DraftMarkingStreamer(WordTokenizer(), mark_drafts=True, stream=marked))

    answer = WordTokenizer().decode(out[0, ids.shape[1] :].tolist()).lstrip()
    assert plain.getvalue() == answer + "\n"
    assert ACCEPTED_DRAFT_STYLE in marked.getvalue()
    unmarked = marked.getvalue().replace(ACCEPTED_DRAFT_STYLE, "").replace(RESET_STYLE, "")
    assert unmarked == answer + "\n"
    # Marked text is exactly what the accepted drafts contributed.
    stats = output_cache(model.generate(**kwargs, return_dict_in_generate=True)).speculation_stats
    marked_words = sum(
        part.split(RESET_STYLE)[0].count(" w") for part in marked.getvalue().split(ACCEPTED_DRAFT_STYLE)[1:]
    )
    assert marked_words == stats.accepted_tokens
