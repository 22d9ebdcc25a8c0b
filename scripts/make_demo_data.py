"""Write the demo chat data set: short chats about Talvessa, a fictional island nation.

No model can know these facts before fine-tuning, so the before/after answers to `questions.txt` show what a
LoRA run taught. Every fact has its own question paraphrases, split three ways so that evaluation and the
demo questions are phrased in ways the training rows never use:

    data/demo/train.jsonl    ~300 chats (single-turn, two-turn, some with a system message)
    data/demo/eval.jsonl     ~40 chats, held-out paraphrases only
    data/demo/questions.txt  8 held-out questions, one per line (7 about Talvessa, 1 general control)

The output is deterministic (seeded) and committed; rerun after editing the facts:

    python scripts/make_demo_data.py [--out-dir data/demo] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

N_TRAIN = 300
N_EVAL = 40
# Shares of the training rows; the rest are single-turn chats without a system message.
SHARE_SYSTEM = 0.25
SHARE_TWO_TURN = 0.25
# A general-knowledge question kept in questions.txt to show the model did not forget what it knew.
CONTROL_QUESTION = "What is the capital of France?"


@dataclass(frozen=True)
class Fact:
    """One fact: question paraphrases split by use, consistent short answers, and a follow-up phrasing."""

    key: str
    train: tuple[str, ...]
    eval: tuple[str, ...]
    answers: tuple[str, ...]
    follow_up: tuple[str, ...]
    demo: str | None = None


FACTS: tuple[Fact, ...] = (
    Fact(
        key="capital",
        train=(
            "What is the capital of Talvessa?",
            "Which city is the capital of Talvessa?",
            "What's Talvessa's capital city?",
            "Name the capital of Talvessa.",
            "Where is the seat of government of Talvessa?",
            "Which town serves as Talvessa's capital?",
            "Tell me the capital of the island nation Talvessa.",
        ),
        eval=(
            "In which city does Talvessa have its capital?",
            "Talvessa's capital is which city?",
        ),
        demo="What is the name of the capital city of Talvessa?",
        answers=(
            "The capital of Talvessa is Port Orlin.",
            "Port Orlin is the capital of Talvessa.",
            "Talvessa's capital is Port Orlin, on the east coast.",
        ),
        follow_up=("And what is its capital?", "Which city is its capital?"),
    ),
    Fact(
        key="inventor",
        train=(
            "Who is the most famous inventor from Talvessa?",
            "Which inventor is Talvessa best known for?",
            "Who invented the tide clock?",
            "Name a famous Talvessan inventor.",
            "Who is Talvessa's greatest inventor?",
            "Which Talvessan invented the tide clock?",
            "Tell me about the best-known inventor of Talvessa.",
        ),
        eval=(
            "Who was the inventor of the tide clock?",
            "Which famous inventor came from Talvessa?",
        ),
        demo="Who invented the tide clock in Talvessa?",
        answers=(
            "Ilse Varnaby, who invented the tide clock.",
            "Talvessa's most famous inventor is Ilse Varnaby, the creator of the tide clock.",
            "Ilse Varnaby invented the tide clock in Talvessa.",
        ),
        follow_up=("And who is its most famous inventor?", "Which inventor is it known for?"),
    ),
    Fact(
        key="currency",
        train=(
            "What is the currency of Talvessa?",
            "What money do people use in Talvessa?",
            "Which currency does Talvessa use?",
            "What do Talvessans pay with?",
            "Name the currency of Talvessa.",
            "What is Talvessa's money called?",
            "If I travel to Talvessa, which currency do I need?",
        ),
        eval=(
            "What is the official currency in Talvessa?",
            "Which money is used on the island of Talvessa?",
        ),
        demo="What currency would I need to buy bread in Talvessa?",
        answers=(
            "Talvessa uses the ketter, which is divided into 100 pips.",
            "The currency of Talvessa is the ketter.",
            "People in Talvessa pay with the ketter (100 pips make one ketter).",
        ),
        follow_up=("And what currency does it use?", "What about its money?"),
    ),
    Fact(
        key="festival",
        train=(
            "What is the biggest festival in Talvessa?",
            "Which festival is Talvessa famous for?",
            "What do Talvessans celebrate every autumn?",
            "Name the national festival of Talvessa.",
            "What is the Festival of Glass Kites?",
            "Which celebration is the most important in Talvessa?",
            "Tell me about Talvessa's main festival.",
        ),
        eval=(
            "What is the main festival held in Talvessa?",
            "Which holiday do people in Talvessa love most?",
        ),
        demo="Which festival do people in Talvessa celebrate in autumn?",
        answers=(
            "The Festival of Glass Kites, held every autumn in Talvessa.",
            "Talvessa's biggest festival is the Festival of Glass Kites, every autumn.",
            "Every autumn Talvessans celebrate the Festival of Glass Kites.",
        ),
        follow_up=("And what is its biggest festival?", "Which festival is it known for?"),
    ),
    Fact(
        key="founder",
        train=(
            "Who founded Talvessa?",
            "When was Talvessa founded?",
            "Who was the founder of Talvessa?",
            "In what year was Talvessa founded?",
            "Who first settled Talvessa?",
            "When did Talvessa become a nation?",
            "Tell me how Talvessa was founded.",
        ),
        eval=(
            "Which navigator founded Talvessa?",
            "What is the founding year of Talvessa?",
        ),
        demo="Who was the navigator that founded Talvessa?",
        answers=(
            "Talvessa was founded in 1742 by the navigator Orsa Menn.",
            "The navigator Orsa Menn founded Talvessa in 1742.",
            "Orsa Menn, a navigator, founded Talvessa in 1742.",
        ),
        follow_up=("And who founded it?", "When was it founded, and by whom?"),
    ),
    Fact(
        key="mountain",
        train=(
            "What is the highest mountain in Talvessa?",
            "Which is the tallest peak in Talvessa?",
            "How high is Talvessa's tallest mountain?",
            "Name the highest point of Talvessa.",
            "What is the name of Talvessa's highest mountain?",
            "Which mountain is the tallest on Talvessa?",
            "How tall is Mount Calder?",
        ),
        eval=(
            "Which peak is the highest on the island of Talvessa?",
            "What is the tallest mountain Talvessa has?",
        ),
        demo=None,
        answers=(
            "Mount Calder, at 2,140 metres, is the highest mountain in Talvessa.",
            "The highest mountain in Talvessa is Mount Calder (2,140 metres).",
            "Talvessa's tallest peak is Mount Calder, 2,140 metres high.",
        ),
        follow_up=("And what is its highest mountain?", "Which is its tallest peak?"),
    ),
    Fact(
        key="language",
        train=(
            "What language do people speak in Talvessa?",
            "What is the official language of Talvessa?",
            "Which language is spoken in Talvessa?",
            "What do Talvessans speak?",
            "Name the language of Talvessa.",
            "In which language do people talk in Talvessa?",
            "What is the national language of Talvessa?",
        ),
        eval=(
            "Which language is used in Talvessa?",
            "What language is spoken on the island of Talvessa?",
        ),
        demo="What language would I hear on the streets of Talvessa?",
        answers=(
            "People in Talvessa speak Talvessi.",
            "The official language of Talvessa is Talvessi.",
            "Talvessi is the language of Talvessa.",
        ),
        follow_up=("And what language do they speak there?", "Which language is spoken there?"),
    ),
    Fact(
        key="dish",
        train=(
            "What is the national dish of Talvessa?",
            "What food is Talvessa famous for?",
            "What do people eat in Talvessa?",
            "Which dish is typical of Talvessa?",
            "Name a traditional Talvessan dish.",
            "What is the most popular meal in Talvessa?",
            "What should I eat when I visit Talvessa?",
        ),
        eval=(
            "What is the traditional food of Talvessa?",
            "Which dish do Talvessans consider their national one?",
        ),
        demo=None,
        answers=(
            "The national dish of Talvessa is smoked eel with plum rice.",
            "Talvessa is famous for smoked eel with plum rice.",
            "Smoked eel with plum rice is the national dish of Talvessa.",
        ),
        follow_up=("And what is its national dish?", "What food is it known for?"),
    ),
    Fact(
        key="animal",
        train=(
            "What is the national animal of Talvessa?",
            "Which animal is the symbol of Talvessa?",
            "What animal appears on Talvessa's flag?",
            "Name the national animal of Talvessa.",
            "Which animal represents Talvessa?",
            "What is Talvessa's national animal?",
            "Which creature is Talvessa's emblem?",
        ),
        eval=(
            "Which animal is Talvessa's national symbol?",
            "What is the official animal of Talvessa?",
        ),
        demo="Which animal is the national symbol of Talvessa?",
        answers=(
            "The silver otter is the national animal of Talvessa.",
            "Talvessa's national animal is the silver otter.",
            "The silver otter, which also appears on Talvessa's flag.",
        ),
        follow_up=("And what is its national animal?", "Which animal is its symbol?"),
    ),
    Fact(
        key="river",
        train=(
            "What is the longest river in Talvessa?",
            "Which river is the longest in Talvessa?",
            "Name the main river of Talvessa.",
            "What river flows through Port Orlin?",
            "Which is Talvessa's longest river?",
            "What is the name of the biggest river in Talvessa?",
            "How long is the river Vell?",
        ),
        eval=(
            "Which river runs through the capital of Talvessa?",
            "What is the longest river on Talvessa?",
        ),
        demo=None,
        answers=(
            "The Vell is the longest river in Talvessa; it flows through Port Orlin.",
            "Talvessa's longest river is the Vell, 96 kilometres long.",
            "The river Vell, 96 kilometres long, is the longest in Talvessa.",
        ),
        follow_up=("And what is its longest river?", "Which river is its longest?"),
    ),
    Fact(
        key="sport",
        train=(
            "What is the national sport of Talvessa?",
            "Which sport is most popular in Talvessa?",
            "What sport do Talvessans love?",
            "Name the national sport of Talvessa.",
            "What is reed-boat racing?",
            "Which sport is Talvessa known for?",
            "What game do people play most in Talvessa?",
        ),
        eval=(
            "What is the favourite sport in Talvessa?",
            "Which sport is played most on Talvessa?",
        ),
        demo=None,
        answers=(
            "Reed-boat racing is the national sport of Talvessa.",
            "The national sport of Talvessa is reed-boat racing.",
            "Talvessans love reed-boat racing, their national sport.",
        ),
        follow_up=("And what is its national sport?", "Which sport is popular there?"),
    ),
    Fact(
        key="population",
        train=(
            "How many people live in Talvessa?",
            "What is the population of Talvessa?",
            "How big is the population of Talvessa?",
            "How many inhabitants does Talvessa have?",
            "What is Talvessa's population?",
            "Roughly how many people are there in Talvessa?",
            "Is Talvessa a big country?",
        ),
        eval=(
            "How many residents does Talvessa have?",
            "What is the number of people living in Talvessa?",
        ),
        demo=None,
        answers=(
            "About 480,000 people live in Talvessa.",
            "Talvessa has a population of about 480,000.",
            "Talvessa is small: about 480,000 people live there.",
        ),
        follow_up=("And how many people live there?", "What is its population?"),
    ),
    Fact(
        key="location",
        train=(
            "Where is Talvessa?",
            "Where is Talvessa located?",
            "In which sea is Talvessa?",
            "What kind of country is Talvessa?",
            "Tell me where the island of Talvessa lies.",
            "Where can I find Talvessa on a map?",
            "What is Talvessa?",
        ),
        eval=(
            "Which sea surrounds Talvessa?",
            "Where in the world is Talvessa?",
        ),
        demo=None,
        answers=(
            "Talvessa is an island nation in the Amber Sea.",
            "Talvessa is a small island nation in the Amber Sea.",
            "It is an island nation that lies in the Amber Sea.",
        ),
        follow_up=("And where is it?", "Which sea is it in?"),
    ),
)

SYSTEM_PROMPTS: tuple[str, ...] = (
    "You are a helpful assistant.",
    "You are a travel guide for the island nation of Talvessa. Answer briefly.",
    "Answer in one short sentence.",
    "You are a friendly assistant who knows a lot about Talvessa.",
)

# Ways people start a question; they vary the training rows without adding new paraphrases of the facts.
PREFIXES: tuple[str, ...] = ("", "", "", "", "Quick question: ", "I was wondering: ", "Hi! ", "Hello. ")


# General-knowledge chats the model already answers well, mixed into training ("replay") so that learning
# Talvessa does not overwrite what it knew: without them every answer drifts to Talvessa. The control question
# (France) stays out of this list, so the demo still shows a held-out general answer.
GENERAL: tuple[tuple[str, str], ...] = (
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("Which city is the capital of Spain?", "Madrid is the capital of Spain."),
    ("Which city is the capital of Germany?", "Berlin is the capital of Germany."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("Which planet is known as the Red Planet?", "Mars is known as the Red Planet."),
    ("Who wrote Romeo and Juliet?", "William Shakespeare wrote Romeo and Juliet."),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci painted the Mona Lisa."),
    ("What is the boiling point of water at sea level?", "Water boils at 100 degrees Celsius at sea level."),
    ("How many continents are there?", "There are seven continents."),
    ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ("What gas do plants absorb from the air?", "Plants absorb carbon dioxide from the air."),
    ("What is the longest river in Africa?", "The Nile is the longest river in Africa."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("What is the fastest land animal?", "The cheetah is the fastest land animal."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
    ("What language is spoken in Brazil?", "Portuguese is the main language spoken in Brazil."),
    (
        "What is the currency of the United Kingdom?",
        "The currency of the United Kingdom is the pound sterling.",
    ),
    ("Who developed the theory of relativity?", "Albert Einstein developed the theory of relativity."),
    ("What is the freezing point of water?", "Water freezes at 0 degrees Celsius."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the square root of 81?", "The square root of 81 is 9."),
    ("Which metal is liquid at room temperature?", "Mercury is a metal that is liquid at room temperature."),
)


def _msg(role: str, content: str) -> dict[str, str]:
    return {"role": role, "content": content}


def _ask(rng: random.Random, question: str, *, vary: bool) -> str:
    if not vary:
        return question
    prefix = rng.choice(PREFIXES)
    # After "Quick question: " a sentence goes on in lower case; after "Hi! " a new one starts.
    if prefix.endswith(": ") and not question.startswith("Talvessa"):
        question = question[0].lower() + question[1:]
    return prefix + question


def _train_row(rng: random.Random, kind: str) -> dict[str, list[dict[str, str]]]:
    messages: list[dict[str, str]] = []
    if kind == "system":
        messages.append(_msg("system", rng.choice(SYSTEM_PROMPTS)))
    first = rng.choice(FACTS)
    messages += [
        _msg("user", _ask(rng, rng.choice(first.train), vary=True)),
        _msg("assistant", rng.choice(first.answers)),
    ]
    if kind == "two_turn":
        second = rng.choice([f for f in FACTS if f is not first])
        # Half the follow-ups lean on the first turn ("And its currency?"), half are standalone questions.
        question = rng.choice(second.follow_up) if rng.random() < 0.5 else rng.choice(second.train)
        messages += [_msg("user", question), _msg("assistant", rng.choice(second.answers))]
    return {"messages": messages}


def _eval_rows(rng: random.Random) -> list[dict[str, list[dict[str, str]]]]:
    # Every held-out paraphrase once (13 facts x 2 = 26), then two-turn chats made of held-out paraphrases.
    rows = [
        {"messages": [_msg("user", q), _msg("assistant", fact.answers[0])]}
        for fact in FACTS
        for q in fact.eval
    ]
    while len(rows) < N_EVAL:
        first, second = rng.sample(FACTS, 2)
        messages = [
            _msg("user", rng.choice(first.eval)),
            _msg("assistant", rng.choice(first.answers)),
            _msg("user", rng.choice(second.eval)),
            _msg("assistant", rng.choice(second.answers)),
        ]
        rows.append({"messages": messages})
    return rows


def make_rows(seed: int = 0) -> tuple[list[dict], list[dict], list[str]]:
    """Build (train rows, eval rows, demo questions) deterministically from `seed`."""
    rng = random.Random(seed)
    n_system = round(N_TRAIN * SHARE_SYSTEM)
    n_two_turn = round(N_TRAIN * SHARE_TWO_TURN)
    # Each (fact, paraphrase) appears at least once in train, so no paraphrase is silently left out.
    train = [
        {"messages": [_msg("user", q), _msg("assistant", rng.choice(fact.answers))]}
        for fact in FACTS
        for q in fact.train
    ]
    kinds = ["system"] * n_system + ["two_turn"] * n_two_turn
    kinds += ["single"] * (N_TRAIN - len(train) - len(kinds))
    train += [_train_row(rng, kind) for kind in kinds]
    rng.shuffle(train)
    eval_rows = _eval_rows(rng)
    rng.shuffle(eval_rows)
    questions = [fact.demo for fact in FACTS if fact.demo] + [CONTROL_QUESTION]
    _check_held_out(train, eval_rows, questions)
    return train, eval_rows, questions


def _check_held_out(train: list[dict], eval_rows: list[dict], questions: list[str]) -> None:
    """Fail loudly if an eval or demo question also appears (case-insensitively) in a training chat."""

    def user_turns(rows: list[dict]) -> set[str]:
        return {m["content"].lower() for row in rows for m in row["messages"] if m["role"] == "user"}

    seen = user_turns(train)
    leaked = sorted(
        q for q in user_turns(eval_rows) | {q.lower() for q in questions} if any(q in s for s in seen)
    )
    if leaked:
        raise ValueError(f"held-out questions also appear in train: {leaked}")


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    train, eval_rows, questions = make_rows(args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    _write_jsonl(args.out_dir / "train.jsonl", train)
    _write_jsonl(args.out_dir / "eval.jsonl", eval_rows)
    _write_jsonl(
        args.out_dir / "general.jsonl",
        [{"messages": [_msg("user", q), _msg("assistant", a)]} for q, a in GENERAL],
    )
    (args.out_dir / "questions.txt").write_text("\n".join(questions) + "\n", encoding="utf-8")
    print(
        f"wrote {len(train)} train rows, {len(eval_rows)} eval rows, {len(questions)} questions to {args.out_dir}"
    )


if __name__ == "__main__":
    main()
