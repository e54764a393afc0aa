"""End to end: the embedded tiny model, an identical copy and a perturbed copy, on a few prompts."""

import json
import math
from pathlib import Path

import pytest
import torch

from qrpo.common.rewards import RewardConfig
from qrpo.common.sandbox import SandboxConfig
from qrpo.evaluate import metrics
from qrpo.evaluate.__main__ import EvalConfig, evaluate, main


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """'tiny', an identical copy in another folder, and a perturbed copy (a run folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrpo.common.tiny import ensure_tiny

    src = ensure_tiny()
    root = tmp_path_factory.mktemp("models")
    paths = {}
    for name, scale in [("copy", 0.0), ("perturbed", 0.05)]:
        model = AutoModelForCausalLM.from_pretrained(src)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
        folder = root / name / "final" if name == "perturbed" else root / name
        model.save_pretrained(folder)
        AutoTokenizer.from_pretrained(src).save_pretrained(folder)
        paths[name] = str(root / name)  # the perturbed one is given as a run folder
    return paths


@pytest.fixture(scope="module")
def result(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "eval.json"
    cfg = EvalConfig(
        models=["tiny", models["copy"], models["perturbed"]],
        n_prompts=4,
        n=3,
        max_new_tokens=10,
        out=str(out),
    )
    return evaluate(cfg), out


def test_writes_json_markdown_samples_and_plots(result):
    res, out = result
    assert json.loads(out.read_text()) == res
    assert res["reference"] == "tiny" and list(res["models"]) == ["tiny", "copy", "perturbed"]
    for key in ("markdown", "samples", "reward_kl_png", "bars_png", "lengths_png"):
        path = Path(res["files"][key])
        assert path.is_file() and path.stat().st_size > 0, key
    assert Path(res["files"]["bars_png"]).read_bytes()[:4] == b"\x89PNG"
    table = Path(res["files"]["markdown"]).read_text()
    assert "| perturbed |" in table and "LC reward" in table and "KL k1" in table
    samples = [json.loads(line) for line in Path(res["files"]["samples"]).read_text().splitlines()]
    assert len(samples) == 3 * 4 * 3


def test_identical_models_have_zero_kl_exactly(result):
    res, _ = result
    ref, copy = res["models"]["tiny"], res["models"]["copy"]
    assert copy["kl_k1"] == 0.0 and copy["kl_k3"] == 0.0
    assert ref["kl_k1"] == 0.0 and ref["win_rate"] == 0.5 and copy["win_rate"] == 0.5
    assert copy["mean_reward"] == ref["mean_reward"]  # same seeds, same weights, same samples
    assert copy["length_bias_spearman"] is None  # the log-ratio is constant (0)
    pert = res["models"]["perturbed"]
    assert pert["path"].endswith("perturbed/final")
    assert pert["kl_k3"] > 0 and math.isfinite(pert["kl_k1"])


def test_summary_matches_the_samples(result):
    """Reward, LC reward, KL and length bias recomputed from the samples file."""
    res, _ = result
    samples = [json.loads(line) for line in Path(res["files"]["samples"]).read_text().splitlines()]
    by_model = {m: [s for s in samples if s["model"] == m] for m in res["models"]}
    ref = by_model["tiny"]
    fit = metrics.fit_length([s["length"] for s in ref], [s["reward"] for s in ref])
    assert res["length_fit"]["b"] == pytest.approx(fit.b)
    for name, rows in by_model.items():
        s = res["models"][name]
        rewards, lengths = [r["reward"] for r in rows], [r["length"] for r in rows]
        assert s["mean_reward"] == pytest.approx(metrics.mean(rewards))
        assert s["lc_reward"] == pytest.approx(metrics.mean(fit.controlled(rewards, lengths)))
    pert = by_model["perturbed"]
    ratio = [r["logp"] - r["ref_logp"] for r in pert]
    assert res["models"]["perturbed"]["kl_k1"] == pytest.approx(metrics.mean(ratio))
    rho = res["models"]["perturbed"]["length_bias_spearman"]
    expected = metrics.spearman([r["length"] for r in pert], ratio)
    assert (rho is None and math.isnan(expected)) or rho == pytest.approx(expected)


def test_logps_match_a_plain_forward(result):
    """The packed no-logits log-prob of a sample equals log_softmax of a plain forward."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qrpo.common.model import resolve
    from qrpo.common.tokenize import encode_completion, encode_prompt

    res, _ = result
    rows = [json.loads(line) for line in Path(res["files"]["samples"]).read_text().splitlines()]
    rec = next(r for r in rows if r["model"] == "perturbed")
    tok = AutoTokenizer.from_pretrained(resolve("tiny"))
    prompt = encode_prompt(tok, "", rec["prompt"])
    ids = prompt + encode_completion(tok, rec["completion"])
    for path, key in [(res["models"]["perturbed"]["path"], "logp"), (resolve("tiny"), "ref_logp")]:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, :-1].double()
        logp = logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
        assert logp[len(prompt) - 1 :].sum().item() == pytest.approx(rec[key], abs=1e-3)


def test_reward_model_scores_through_the_cli(models, tmp_path):
    """A tiny random sequence classifier as the reward model, configured from the command line;
    its scores do not depend on batching (padding)."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from qrpo.common.reward_model import RewardModel
    from qrpo.common.tiny import ensure_tiny, model_config

    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    torch.manual_seed(3)
    rm = LlamaForSequenceClassification(
        model_config(len(tok), num_labels=1, pad_token_id=tok.pad_token_id)
    )
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    scorer = RewardModel(
        RewardConfig(fn="model", model=str(tmp_path / "rm"), batch_size=4, device="cpu")
    )
    texts = ["1 2 3", "3 2 1 0 0 0 9", "", "sort me please"]
    one_by_one = [scorer.score_texts([t])[0] for t in texts]
    assert scorer.score_texts(texts) == pytest.approx(one_by_one, abs=1e-5)
    assert len(set(one_by_one)) == 4

    out = tmp_path / "rm_eval" / "eval.json"
    main(
        [
            f"models=[tiny,{models['perturbed']}]",
            "reward.fn=model",
            f"reward.model={tmp_path / 'rm'}",
            "n_prompts=3",
            "n=2",
            "max_new_tokens=6",
            "kl=false",
            "plots=false",
            f"out={out}",
        ]
    )
    res = json.loads(out.read_text())
    samples = [json.loads(x) for x in Path(res["files"]["samples"]).read_text().splitlines()]
    rewards = [s["reward"] for s in samples]
    assert len(set(rewards)) > 1 and all(isinstance(r, float) for r in rewards)
    assert res["models"]["perturbed"]["kl_k1"] is None  # kl=false


def test_code_rewards_end_to_end(tmp_path):
    """reward.fn=code: problems as prompts, pass@k and per-sample reasons in the samples."""
    problems = tmp_path / "problems.jsonl"
    rows = [
        {
            "task_id": "add",
            "prompt": "def add(a, b):\n",
            "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"
            "    assert candidate(0, 0) == 0\n",
            "entry_point": "add",
        },
        {"task_id": "one", "prompt": "def one():\n", "tests": ["assert one() == 1"]},
    ]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = evaluate(
        EvalConfig(
            models=["tiny"],
            prompts=str(problems),
            reward=RewardConfig(fn="code", sandbox=SandboxConfig(wall_seconds=2.0, workers=2)),
            n=2,
            max_new_tokens=8,
            pass_k=[1, 2],
            out=str(tmp_path / "code" / "eval.json"),
        )
    )
    s = res["models"]["tiny"]
    assert s["pass@1"] == 0.0 and s["pass@2"] == 0.0  # a random model writes no working code
    assert sum(s["statuses"].values()) == 4
    samples = [json.loads(x) for x in Path(res["files"]["samples"]).read_text().splitlines()]
    assert all("status" in r["detail"] and r["detail"]["tests"] for r in samples)
    assert "pass@2" in Path(res["files"]["markdown"]).read_text()
