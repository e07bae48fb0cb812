"""TRL's own GRPOTrainer, unchanged, for one training step against a live server.

Opt-in: skipped when trl is not importable (it needs torch; docs/rl.md shows a CPU-only venv).
The model is built here, not downloaded: a one-layer Qwen2 on a character tokenizer with TRL's
Qwen3 chat template, whose logits are pushed onto a script, so its rollouts really call the tools:
every rollout calls run_python, then submit, then answers in plain text. Its own small random weights still get GRPO's gradients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

trl = pytest.importorskip("trl", reason="trl (and torch) are not installed: see docs/rl.md")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from sandbox_env.client.trl import (  # noqa: E402
    AsyncSandboxToolEnv,
    SandboxToolEnv,
    async_code_reward,
    code_reward,
)

PY_TASK = {
    "id": "py-add", "prompt": "Write add(a, b) returning the sum.",
    "tests": {"kind": "asserts", "asserts": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]},
}
SOLUTION = "def add(a, b):\n    return a + b"
C_SOLUTION = "#include <stdio.h>\nint main(void){long a,b;scanf(\"%ld %ld\",&a,&b);printf(\"%ld\\n\",a+b);return 0;}\n"
C_TASK = {
    "id": "c-add", "prompt": "Read two integers from stdin and print their sum, in C.",
    "tests": {"kind": "stdio", "language": "c", "cases": [
        {"input": "1 2\n", "output": "3\n"}, {"input": "-5 5\n", "output": "0\n"}]},
}


def script(solution: str, fence: str) -> tuple[list[str], str]:
    """The bodies of the script's two tool calls (each one token), and its final answer."""
    calls = ["\n" + json.dumps({"name": "run_python", "arguments": {"code": "print(6 * 7)"}}) + "\n",
             "\n" + json.dumps({"name": "submit", "arguments": {"code": solution}}) + "\n"]
    return calls, f"```{fence}\n{solution}\n```"  # the answer is plain text, graded by code_reward
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>",
            "</tool_call>", "<tool_response>", "</tool_response>"]


def build_tokenizer(calls: list[str], answer: str) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = [chr(c) for c in range(32, 127)] + ["\n", "\t"]
    vocab = {ch: i for i, ch in enumerate(["<unk>", *chars])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": SPECIALS})
    fast.add_tokens([*calls, answer])  # one token each: the script is a few tokens long
    template = Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
    fast.chat_template = template.read_text(encoding="utf-8")
    fast.padding_side = "left"
    return fast


class ScriptedQwen2(transformers.Qwen2ForCausalLM):  # type: ignore[misc,name-defined]
    """Logits = the model's own + a large bonus on the scripted next token (see the module doc).

    The script, from the last token: `<tool_call>` -> the next call's body -> `</tool_call>` ->
    end of turn; any other token (a turn's start) -> `<tool_call>` while calls remain, else the answer.
    Tool-call markers are tokens of their own because TRL's response parser looks for them."""

    ids: dict[str, Any] = {}

    def forward(self, input_ids: Any = None, **kwargs: Any) -> Any:
        kwargs["use_cache"] = False  # every call sees the whole sequence, which the script reads
        kwargs.pop("past_key_values", None)
        out = super().forward(input_ids=input_ids, **kwargs)
        ids = self.ids
        calls = torch.tensor(ids["calls"], device=input_ids.device)
        is_call = torch.isin(input_ids, calls)
        made = torch.cumsum(is_call.long(), dim=1)
        target = torch.where(made < len(ids["calls"]), ids["open"], ids["answer"])
        target = torch.where(input_ids == ids["open"], calls[made.clamp(max=len(ids["calls"]) - 1)], target)
        target = torch.where(is_call, ids["close"], target)
        ends = (input_ids == ids["close"]) | (input_ids == ids["answer"])
        target = torch.where(ends, ids["end"], target)
        bonus = torch.nn.functional.one_hot(target, out.logits.shape[-1]).to(out.logits.dtype) * 50.0
        out.logits = out.logits + bonus
        return out


def build_model(tokenizer: Any, calls: list[str], answer: str) -> Any:
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=False)
    torch.manual_seed(0)
    model = ScriptedQwen2(config)
    model.ids = {"calls": tokenizer.convert_tokens_to_ids(calls),
                 "answer": tokenizer.convert_tokens_to_ids(answer),
                 "open": tokenizer.convert_tokens_to_ids("<tool_call>"),
                 "close": tokenizer.convert_tokens_to_ids("</tool_call>"),
                 "end": tokenizer.eos_token_id}
    return model


def train_one_step(factory: type, rows: list[dict[str, Any]], reward_funcs: list[Any],
                   out_dir: Path, calls: list[str], answer: str) -> Any:
    tokenizer = build_tokenizer(calls, answer)
    args = trl.GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=2, num_generations=2, max_steps=1,
        max_completion_length=600, max_tool_calling_iterations=3, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", temperature=1.0)
    trainer = trl.GRPOTrainer(
        model=build_model(tokenizer, calls, answer), processing_class=tokenizer, args=args,
        train_dataset=datasets.Dataset.from_list(rows), reward_funcs=reward_funcs,
        environment_factory=factory)
    trainer.train()
    return trainer


def run_task(url: str, base: type, task: dict[str, Any], solution: str, fence: str,
             tmp_path: Path) -> None:
    made: list[Any] = []

    class Env(base):  # type: ignore[misc,valid-type]
        base_url = url

        def __init__(self) -> None:
            super().__init__()
            made.append(self)

    if base is AsyncSandboxToolEnv:
        async def reward(completions: list[Any], **kwargs: Any) -> list[float | None]:
            return await async_code_reward(completions, base_url=url, **kwargs)
    else:
        def reward(completions: list[Any], **kwargs: Any) -> list[float | None]:
            return code_reward(completions, base_url=url, **kwargs)

    rows = [{"prompt": [{"role": "user", "content": "Solve it with the tools."}], "task": task}] * 2
    calls, answer = script(solution, fence)
    trainer = train_one_step(Env, rows, [reward], tmp_path, calls, answer)
    try:
        history = trainer.state.log_history[0]
        # The script's run_python and submit calls ran in the sandbox; the submission passed.
        assert history["tools/call_frequency"] > 0 and history["tools/failure_frequency"] == 0
        assert history["rewards/Env/mean"] == 1.0  # get_reward: the graded submit
        assert history["rewards/reward/mean"] == 1.0  # code_reward: the final answer's code block
        used = [env for env in made if env.last_grading is not None]
        assert used and all(env.last_grading.passed == env.last_grading.total > 0 for env in used)
    finally:
        for env in made:
            env.close()


@pytest.fixture(autouse=True)
def _quiet_trl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")  # environment_factory is "experimental"


@pytest.mark.parametrize("base", [SandboxToolEnv, AsyncSandboxToolEnv])
def test_grpo_trainer_runs_a_python_task(live_server, base: type, tmp_path: Path) -> None:
    run_task(live_server.url, base, PY_TASK, SOLUTION, "python", tmp_path)


def test_grpo_trainer_runs_a_c_task(live_server, tmp_path: Path) -> None:
    run_task(live_server.url, SandboxToolEnv, C_TASK, C_SOLUTION, "c", tmp_path)
