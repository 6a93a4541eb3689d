"""The quality gate: yes/no questions about a generate or edit request's own picture, scored
from the understanding path's first answer token.

Owns: the tokens that start a yes and a no answer (``answer_ids``), the context one question
is asked in (``question_path``: the "understand" task's context — the request's input pictures
and then its result as ViT blocks, then the question — without think), and ``score``: every
question of a run prefilled together (``ContextStore.prefill``: one packed forward per context
level, common prefixes such as a picture shared by several questions once) and answered by one
decode forward for all of them (one per question in naive mode). Nothing is decoded: the first
answer token's float32 softmax over the whole vocabulary, summed over the yes ids and over the
no ids, is the ``GateAnswer``. Greedy and without a generator, so a request's draws are the
same whether it is gated or not. Leaves which requests are gated and the result picture's
resize to ``engine.py``.

Conventions (``loops.decode_texts`` at its step 0): the answer's first token is what the model
predicts after ``<|im_start|>`` is fed at the end of the question's context, so an "understand"
request with the same pictures and the question as prompt gets the same first-step logits.

Departures from the reference: the reference has no gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bagel.contexts import ContextPath, ContextStore, Counters, TextItem, VitItem
from bagel.errors import CheckpointError
from bagel.kv_cache import KVCache
from bagel.model import BagelModel
from bagel.packing import PackBuilder
from bagel.requests import GateAnswer
from bagel.tokenizer import Tokenizer

YES_VARIANTS = ("Yes", "yes", " Yes", " yes")
NO_VARIANTS = ("No", "no", " No", " no")


@dataclass(frozen=True)
class AnswerIds:
    """Token ids that start a yes answer and a no answer; the two sets are disjoint."""

    yes: tuple[int, ...]
    no: tuple[int, ...]


def answer_ids(tokenizer: Tokenizer) -> AnswerIds:
    """The first token id of each yes / no variant, deduplicated, in variant order. An id that
    starts a yes variant and a no variant alike says neither and is left out of both: a small
    vocabulary splits " Yes" and " No" into a space token and the word (the tiny test
    checkpoint does), Qwen2's has a token for each. Raises ``CheckpointError`` when no id is
    left for yes or for no."""
    yes = {tokenizer.encode(v)[0]: None for v in YES_VARIANTS}
    no = {tokenizer.encode(v)[0]: None for v in NO_VARIANTS}
    ids = AnswerIds(tuple(i for i in yes if i not in no), tuple(i for i in no if i not in yes))
    if not ids.yes or not ids.no:
        raise CheckpointError(f"tokenizer: no token starts only a yes answer {YES_VARIANTS} or only a no "
                              f"answer {NO_VARIANTS} (first ids {list(yes)} and {list(no)}): the gate cannot score")
    return ids


@dataclass(frozen=True)
class GateQuestion:
    """One question about request ``index``'s picture and the context it is asked in."""

    index: int
    text: str
    path: ContextPath


def question_path(input_keys: Sequence[str], result_key: str, question: str) -> ContextPath:
    """The context of ``question`` about the picture ``result_key`` made from the pictures
    ``input_keys`` (an edit's input; none for a generation): each as a ViT block, then the
    question — the "understand" task's context for those pictures, without think."""
    return (*(VitItem(key) for key in input_keys), VitItem(result_key), TextItem(question))


def score(model: BagelModel, tokenizer: Tokenizer, cache: KVCache, store: ContextStore,
          questions: Sequence[GateQuestion], ids: AnswerIds, counters: Counters, *,
          naive: bool = False) -> list[GateAnswer]:
    """Answer every question, in order. ``store.vit_inputs`` must hold each picture the paths
    name; pictures it has encoded already are not encoded again."""
    if not questions:
        return []
    store.prefill([q.path for q in questions], [q.index for q in questions])
    lm = model.language_model
    groups = [[q] for q in questions] if naive else [list(questions)]
    logits = []
    for group in groups:
        builder = PackBuilder(cache)
        for q in group:
            builder.add_text([tokenizer.bos_id], store.get(q.path))
        batch = builder.build(model.device)
        hidden = lm(lm.embed(batch.text_ids), batch, cache)  # [Q, C]: one row per question
        logits.append(lm.lm_head(hidden).float())
        counters.forward({q.index for q in group})
    probs = torch.softmax(torch.cat(logits), dim=-1)  # [Q, V] float32
    device = probs.device
    yes = probs.index_select(1, torch.tensor(ids.yes, device=device)).sum(dim=1)
    no = probs.index_select(1, torch.tensor(ids.no, device=device)).sum(dim=1)
    pairs = torch.stack([yes, no], dim=1).tolist()  # the gate's one host sync: the answers leave the device
    return [GateAnswer(q.text, y / (y + n) if y + n > 0 else 0.5, y, n) for q, (y, n) in zip(questions, pairs)]
