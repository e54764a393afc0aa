r"""Step 3, `python -m qrpo.generate.ref_logps`: summed reference log-probs of every completion.

    python -m qrpo.generate.ref_logps out=runs/gen model.name_or_path=REF \
        ref_logps.micro_batch_tokens=16384 ref_logps.mixed_precision=bf16

With precomputed log-probs, training holds no reference model (`ref.source=data`). They must be
what the training loop would compute at step 0, so this step runs the training loop's own code:
qrpo.common.tokenize for the tokens (completion + EOS), `qrpo.kernels.sequence_model.SequenceLogprobModel`
(the no-logits kernel `kernels.sequence_logprobs`) and its `sequence_logps` over
`qrpo.common.packing.pack`/`collate` micro-batches, under the loop's autocast policy. Give it the training run's model, dtype, kernel
backend and mixed precision; the loop checks the first `ref.check_rows` rows against the start
policy before training. Nothing is truncated here: rows over the training run's
data.max_length are the training run's to drop or refuse.

It fills `ref_logp` of every completion of its input rows: after `build` (the default order)
that is every training completion; before it, every sample.
"""

from __future__ import annotations

import sys

import torch

from qrpo.common.data import DataConfig
from qrpo.common.tokenize import tokenize_rows
from qrpo.generate.runner import cli, exit_on_error, run_shard_step


def make_worker(cfg, source: str):
    from qrpo.common.model import load_model, load_tokenizer
    from qrpo.common.packing import Example, Sequence
    from qrpo.kernels.sequence_model import SequenceLogprobModel, autocast, sequence_logps

    rc = cfg.ref_logps
    if rc.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(rc.device)
    tokenizer = load_tokenizer(cfg.model)
    model = SequenceLogprobModel(load_model(cfg.model, device), rc.kernel_backend)
    model.to(device).eval().requires_grad_(False)
    no_limit = DataConfig(max_length=sys.maxsize)

    def work(rows: list[dict]) -> tuple[list[dict], int]:
        if not rows:
            return [], 0
        tokenized, _ = tokenize_rows(rows, tokenizer, no_limit, source)
        # One example per completion, built as the training loop builds a sequence.
        examples = [
            Example([Sequence(r["prompt_ids"] + c["completion_ids"], len(r["prompt_ids"]), 0)])
            for r in tokenized
            for c in r["completions"]
        ]
        with autocast(device, rc.mixed_precision):
            logps = sequence_logps(model, examples, rc.micro_batch_tokens, device).cpu().tolist()
        values = iter(logps)
        out = [
            {**r, "completions": [{**c, "ref_logp": next(values)} for c in r["completions"]]}
            for r in rows
        ]
        return out, sum(e.num_tokens for e in examples)

    return work


def main(argv: list[str] | None = None) -> None:
    cli("ref_logps", argv, __doc__, lambda cfg: run_shard_step(cfg, "ref_logps", make_worker))


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
