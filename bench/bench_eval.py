"""Keyword eval over 64 prompts on the real bundled SmolLM2: the project's batched runner against one `generate`
per prompt, greedy both ways, counting how many answers match."""
from __future__ import annotations


from pathlib import Path

from .common import median, ratio, result, summarise_session, timings
from .workspaces import apply_env, temp_home, workspace_env

GOAL = 3.0
DATA = Path(__file__).resolve().parent.parent / "continuous_learning" / "data"
COUNTRIES = [("Italy", "Rome"), ("Spain", "Madrid"), ("Canada", "Ottawa"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
             ("Norway", "Oslo"), ("Peru", "Lima"), ("Poland", "Warsaw"), ("Greece", "Athens"), ("Chile", "Santiago"),
             ("Austria", "Vienna"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Sweden", "Stockholm"),
             ("Thailand", "Bangkok"), ("Cuba", "Havana")]
QUESTIONS = ["What is the capital of {c}?", "Name the capital city of {c} in one word.",
             "Which city is the seat of government of {c}? Answer briefly."]


def eval_items(count: int):
    """`count` keyword items: the shipped general and demo sets, then capital-city questions of varied phrasing."""
    from continuous_learning.evaluate import EvalItem, load_eval_file

    items = load_eval_file(DATA / "general_qa.jsonl") + load_eval_file(DATA / "demo_eval.jsonl")
    extra = [EvalItem(prompt=q.format(c=country), keywords=(capital,)) for q in QUESTIONS for country, capital in COUNTRIES]
    return (items + extra)[:count]


def run(repeats: int, quick: bool) -> dict:
    with temp_home('eval') as home:
        return _run(home, repeats, quick)


def _run(home, repeats: int, quick: bool) -> dict:
    env = workspace_env(home)
    apply_env(env)
    from continuous_learning.evaluate import _answer, _conversations, score_items
    from continuous_learning.chat.models import ChatModel
    from continuous_learning.core.settings import load_settings

    settings = load_settings()
    count, new_tokens = (8, 16) if quick else (64, settings.eval.max_new_tokens)
    if quick:
        settings = load_settings(overrides={"eval": {"max_new_tokens": new_tokens}})
    items = eval_items(count)
    conversations = _conversations(settings, items)
    chat = ChatModel.load(settings)
    chat.generate_batch(conversations[:2], max_new_tokens=4, batch_size=2)  # warm-up
    runs = 1 if not quick else max(1, min(repeats, 2))  # the one-by-one baseline alone takes minutes per run

    def ours() -> list[str]:
        return _answer(chat, conversations, settings)[0]

    def one_by_one() -> list[str]:
        return chat.generate_batch(conversations, max_new_tokens=new_tokens, batch_size=1)

    ours_s, ours_out = timings(ours, runs)
    base_s, base_out = timings(one_by_one, runs)
    from pyinstrument import Profiler

    profiler = Profiler(interval=0.005)
    profiler.start()
    _answer(chat, conversations[: min(16, count)], settings)
    profiler.stop()

    same = sum(a == b for a, b in zip(ours_out, base_out))
    ours_med, base_med = median(ours_s), median(base_s)
    value = ratio(base_med, ours_med)
    raw = {
        "prompts": count, "max_new_tokens": new_tokens, "torch_threads": env["CL_MODEL_THREADS"], "batch_size": settings.eval.batch_size, "runs": runs,
        "ours_s": [round(s, 2) for s in ours_s], "one_by_one_s": [round(s, 2) for s in base_s],
        "same_answers": same, "accuracy_ours": score_items(items, ours_out)["accuracy"],
        "accuracy_one_by_one": score_items(items, base_out)["accuracy"],
        "differing": [{"prompt": i.prompt, "batched": a, "one_by_one": b}
                      for i, a, b in zip(items, ours_out, base_out) if a != b][:5],
    }
    return result(
        workload=f"keyword eval over {count} prompts (real bundled SmolLM2-135M)",
        baseline="one model.generate per prompt (greedy, same max_new_tokens)",
        goal=">= 3x, same answers under greedy decoding (count reported)",
        ratio_value=value, goal_met=value is not None and value >= GOAL, raw=raw,
        where_time_goes=summarise_session(profiler.last_session, 6),
        summary=(f"batched runner {ours_med:.1f} s against {base_med:.1f} s one by one ({value}x); {same}/{count} answers "
                 f"identical; keyword accuracy {raw['accuracy_ours']:.2f} batched, {raw['accuracy_one_by_one']:.2f} one by one. "
                 "The runner sorts prompts by length, runs the shared prompt prefix once, computes last-position logits only "
                 "and drops finished rows from the batch (evaluate.greedy_batch)."),
    )
