"""The reference stored in the compute dtype gives the same numbers as autocast's casts."""

import copy
import random

import torch

from qrpo.common.model import ModelConfig, load_model
from qrpo.common.packing import Example, Sequence, collate
from qrpo.kernels.sequence_model import SequenceLogprobModel
from qrpo.train.accelerator import freeze_reference


def test_reference_in_compute_dtype_equals_autocast_of_fp32_weights():
    causal_lm = load_model(ModelConfig(), log=lambda *_: None)
    plain = SequenceLogprobModel(causal_lm, "torch").eval().requires_grad_(False)
    frozen = freeze_reference(copy.deepcopy(plain), torch.bfloat16)
    linears = [m for m in frozen.modules() if isinstance(m, torch.nn.Linear)]
    head = frozen.model.get_output_embeddings()
    assert all(m.weight.dtype == torch.bfloat16 for m in linears if m is not head)
    assert head.weight.dtype == torch.float32  # tied to the fp32 input embedding
    assert frozen.model.get_input_embeddings().weight.dtype == torch.float32

    rng = random.Random(0)
    examples = []
    for n in (7, 30, 12):
        ids = [rng.randrange(3, causal_lm.config.vocab_size) for _ in range(n)]
        examples.append(Example([Sequence(ids, 3, 0)]))
    batch = collate(examples)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = plain(*batch.model_inputs())
        got = frozen(*batch.model_inputs())
    assert torch.equal(got, expected)
