"""What a load test sends: a deterministic sequence of prompts.

``simple`` cycles through a built-in list of short prompts. ``shared-prefix`` models a fleet of
applications, each with its own long system prompt: every request is one of K system prompts
followed by a short question, so requests sharing a system prompt share a long cacheable prefix
(the prefix-affinity benchmark). Prompts are plain text, so any model works, chat template or not.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SIMPLE_PROMPTS = (
    "The capital of France is",
    "Explain in one sentence what a Kubernetes pod is.",
    "Write a haiku about the sea.",
    "List three uses of a hash table:",
    "Once upon a time, in a small village by the river,",
    "The difference between a process and a thread is",
    "def fibonacci(n):",
    "Translate to French: good morning, how are you?",
    "The three primary colours are",
    "A short summary of the water cycle:",
    "Why is the sky blue?",
    "Give one tip for writing clear documentation:",
)

QUESTIONS = (
    "How do I reset my password?",
    "What are your opening hours?",
    "Can you summarise the policy in one line?",
    "Which plan should a small team choose?",
    "How long does delivery take?",
    "Is there a discount for students?",
    "What should I do if the service is down?",
    "How can I contact a human?",
)

_TOPICS = ("billing", "shipping", "accounts", "security", "hardware", "travel", "insurance", "education",
           "gardening", "cooking", "banking", "software", "music", "fitness", "housing", "energy")
_WORDS = ("customer", "request", "policy", "answer", "always", "never", "politely", "clearly", "account",
          "service", "order", "refund", "detail", "question", "support", "team", "product", "price",
          "guide", "check", "confirm", "explain", "briefly", "helpful", "safety", "privacy", "record",
          "schedule", "option", "update", "review", "issue", "report", "secure", "simple", "friendly")


def system_prompt(index: int, num_words: int) -> str:
    """The ``index``-th system prompt: about ``num_words`` words, distinct from its first words on
    (prefix affinity keys on the leading tokens)."""
    rng = random.Random(index)
    topic = _TOPICS[index % len(_TOPICS)]
    head = f"System prompt {index}: you are the {topic} assistant of company number {1000 + index}."
    body = " ".join(rng.choice(_WORDS) for _ in range(max(0, num_words - 12)))
    return f"{head} Follow these rules: {body}."


@dataclass(frozen=True)
class WorkItem:
    """One request's input: a plain prompt, and which shared prefix it carries (-1: none)."""

    prompt: str
    prefix_index: int = -1


class Workload:
    """A deterministic, endless sequence of :class:`WorkItem`; owns its random generator."""

    name = "workload"

    def __init__(self, seed: int = 0) -> None:
        self.rng = random.Random(seed)

    def next(self) -> WorkItem:
        raise NotImplementedError


class SimpleWorkload(Workload):
    """Cycles through :data:`SIMPLE_PROMPTS` (in order, so a short run covers them all)."""

    name = "simple"

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self._i = seed

    def next(self) -> WorkItem:
        item = WorkItem(SIMPLE_PROMPTS[self._i % len(SIMPLE_PROMPTS)])
        self._i += 1
        return item


class SharedPrefixWorkload(Workload):
    """Each request: one of ``num_prefixes`` system prompts (chosen uniformly at random) + a question.

    ``first_prefix`` picks a different set of system prompts (indices from it on): two runs on the
    same server with disjoint sets cannot hit each other's prefix cache.
    """

    name = "shared-prefix"

    def __init__(self, num_prefixes: int = 8, prefix_words: int = 250, seed: int = 0, first_prefix: int = 0) -> None:
        if num_prefixes < 1 or prefix_words < 1:
            raise ValueError("need num_prefixes >= 1 and prefix_words >= 1")
        super().__init__(seed)
        self.prefixes = [system_prompt(first_prefix + i, prefix_words) for i in range(num_prefixes)]

    def next(self) -> WorkItem:
        k = self.rng.randrange(len(self.prefixes))
        question = self.rng.choice(QUESTIONS)
        return WorkItem(f"{self.prefixes[k]}\n\nQuestion: {question}\nAnswer:", k)


WORKLOADS = ("simple", "shared-prefix")


def make_workload(name: str, *, seed: int = 0, num_prefixes: int = 8, prefix_words: int = 250) -> Workload:
    if name == "simple":
        return SimpleWorkload(seed)
    if name == "shared-prefix":
        return SharedPrefixWorkload(num_prefixes, prefix_words, seed)
    raise ValueError(f"unknown workload {name!r}; allowed: {', '.join(WORKLOADS)}")
