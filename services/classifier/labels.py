"""The classifier's label set and how declared agent domains map onto it."""

from __future__ import annotations

DOMAINS = ("health", "environment", "math", "code", "general")
SUB_LABELS: dict[str, tuple[str, ...]] = {
    "health": ("symptoms", "vitals", "medication", "lifestyle", "mental_health"),
    "environment": ("air", "noise", "traffic", "weather", "urban_events"),
    "math": ("arithmetic", "algebra", "calculus", "statistics", "geometry"),
    "code": ("python", "web", "sql", "shell", "systems", "algorithms"),
    "general": ("chitchat", "facts", "writing", "howto"),
}
DIFFICULTIES = ("easy", "medium", "hard")
# Names agents may declare instead of a label ("knowledge.gpt/arithmetic" in the paper).
ALIASES: dict[str, str] = {
    "medical": "health",
    "medicine": "health",
    "wellness": "health",
    "wearable": "health/vitals",
    "fitness": "health/lifestyle",
    "sleep": "health/lifestyle",
    "nutrition": "health/lifestyle",
    "mental": "health/mental_health",
    "city": "environment",
    "urban": "environment",
    "smart_city": "environment",
    "smart-city": "environment",
    "air_quality": "environment/air",
    "air-quality": "environment/air",
    "pollution": "environment/air",
    "camera": "environment/urban_events",
    "events": "environment/urban_events",
    "crowd": "environment/urban_events",
    "mathematics": "math",
    "maths": "math",
    "programming": "code",
    "coding": "code",
    "software": "code",
    "javascript": "code/web",
    "chat": "general/chitchat",
}
_SUB_TO_DOMAIN = {sub: domain for domain, subs in SUB_LABELS.items() for sub in subs}


def fine_label(domain: str, sub: str) -> str:
    """The head's label for a (domain, sub-label) pair, e.g. 'environment/air'."""
    return f"{domain}/{sub}"


def resolve(declared: str) -> tuple[str, str | None] | None:
    """(domain, sub-label or None) that a declared name stands for; None when unknown."""
    name = ALIASES.get(declared.strip().lower(), declared.strip().lower())
    domain, _, sub = name.partition("/")
    if domain in SUB_LABELS:
        return (domain, sub) if sub in SUB_LABELS[domain] else (domain, None)
    if domain in _SUB_TO_DOMAIN:
        return _SUB_TO_DOMAIN[domain], domain
    return None
