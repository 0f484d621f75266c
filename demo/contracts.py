"""Synthetic contract-clause data: the demo's "team domain".

Three skills, each asked as a prompt the model completes after "Answer:":
- clause_type:    which of six kinds of clause this is (chance: 1 in 6)
- extract_date:   copy the date the clause names
- extract_amount: copy the amount of money the clause names

The same generator makes the training set (demo/train_tiny_llama.py), the calibration set and
the held-out evaluation set (calibration_data/contracts/). Sets are drawn from disjoint seeds and
de-duplicated by clause, so no evaluation item is ever trained or calibrated on.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

CLAUSE_TYPES = [
    "termination",
    "payment",
    "confidentiality",
    "indemnification",
    "governing_law",
    "warranty",
]
PARTIES = [
    "the Supplier",
    "the Customer",
    "the Licensor",
    "the Licensee",
    "the Contractor",
    "the Client",
    "the Vendor",
    "the Buyer",
    "the Seller",
    "the Company",
    "the Tenant",
    "the Landlord",
    "the Provider",
    "the Distributor",
]
MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
STATES = ["New York", "Delaware", "California", "Texas", "England and Wales", "Ontario", "Ireland"]

# Each clause kind has several phrasings; {a}/{b} are parties, {date}/{amount}/{state} values.
TEMPLATES: dict[str, list[str]] = {
    "termination": [
        "Either party may terminate this Agreement on {date} by written notice, and {a} shall pay {b} a termination fee of {amount}.",
        "{a} may end this Agreement with effect from {date} upon payment of {amount} to {b}.",
        "This Agreement terminates on {date} unless renewed; on early termination {a} owes {b} {amount}.",
    ],
    "payment": [
        "{a} shall pay {b} the sum of {amount} no later than {date}.",
        "Invoices totalling {amount} are due from {a} to {b} on {date}.",
        "{a} agrees to remit {amount} to {b} by {date}, without set-off.",
    ],
    "confidentiality": [
        "{a} shall keep confidential all information disclosed by {b} until {date}; a breach carries liquidated damages of {amount}.",
        "Until {date}, {a} must not disclose {b}'s trade secrets, on pain of a penalty of {amount}.",
        "All non-public information received by {a} from {b} stays secret through {date}; damages for disclosure are fixed at {amount}.",
    ],
    "indemnification": [
        "{a} shall indemnify and hold harmless {b} against all claims arising before {date}, up to {amount}.",
        "{a} will defend {b} from third-party losses incurred until {date}, capped at {amount}.",
        "{b} is indemnified by {a} for damages up to {amount} for events occurring before {date}.",
    ],
    "governing_law": [
        "This Agreement, signed on {date} with a value of {amount}, is governed by the laws of {state}.",
        "The laws of {state} govern this Agreement dated {date}; disputes over {amount} go to its courts.",
        "Any dispute under this Agreement of {date}, worth {amount}, is decided under the law of {state}.",
    ],
    "warranty": [
        "{a} warrants to {b} that the goods are free from defects until {date}, with repairs up to {amount}.",
        "{a} guarantees its work for {b} through {date} and will refund up to {amount} if it fails.",
        "The products supplied by {a} to {b} carry a warranty expiring on {date}, covering {amount}.",
    ],
}
QUESTIONS = {
    "clause_type": "What type of clause is this?",
    "extract_date": "What date does the clause state?",
    "extract_amount": "What amount does the clause state?",
}
SKILLS = list(QUESTIONS)


@dataclass(frozen=True)
class Item:
    """One question about one clause. `prompt` ends with "Answer:"; `answer` has no leading
    space."""

    id: str
    task: str
    prompt: str
    answer: str


def _clause(rng: random.Random) -> tuple[str, str, str, str]:
    kind = rng.choice(CLAUSE_TYPES)
    a, b = rng.sample(PARTIES, 2)
    date = f"{rng.choice(MONTHS)} {rng.randint(1, 28)}, {rng.randint(2020, 2031)}"
    amount = f"${rng.randint(1, 999)},{rng.randint(0, 999):03d}"
    text = rng.choice(TEMPLATES[kind]).format(
        a=a, b=b, date=date, amount=amount, state=rng.choice(STATES)
    )
    return kind, text[0].upper() + text[1:], date, amount


def make_prompt(clause: str, task: str) -> str:
    return f"Clause: {clause}\nQuestion: {QUESTIONS[task]}\nAnswer:"


def clause_of(prompt: str) -> str:
    return prompt.split("\n", 1)[0].removeprefix("Clause: ")


def generate(n: int, seed: int, exclude: set[str] = frozenset()) -> list[Item]:
    """`n` items spread evenly over the three skills, none about a clause in `exclude`.

    Each clause is asked about once, so sets that exclude each other's clauses share nothing.
    """
    rng = random.Random(seed)
    items: list[Item] = []
    seen = set(exclude)
    while len(items) < n:
        kind, clause, date, amount = _clause(rng)
        task = SKILLS[len(items) % len(SKILLS)]
        if clause in seen:
            continue
        seen.add(clause)
        prompt = make_prompt(clause, task)
        answer = {"clause_type": kind, "extract_date": date, "extract_amount": amount}[task]
        items.append(Item(id=f"s{seed}-{len(items)}", task=task, prompt=prompt, answer=answer))
    return items


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_domain_sets(out_dir: Path, n_calibration: int = 512, n_eval: int = 300) -> None:
    """Write calibration.jsonl (text only) and eval.jsonl (prompt/answer) for the contracts
    domain."""
    evaluation = generate(n_eval, seed=1001)
    held_out = {clause_of(it.prompt) for it in evaluation}
    calibration = generate(n_calibration, seed=2002, exclude=held_out)
    write_jsonl(out_dir / "eval.jsonl", [asdict(it) for it in evaluation])
    write_jsonl(
        out_dir / "calibration.jsonl",
        [{"text": f"{it.prompt} {it.answer}"} for it in calibration],
    )


if __name__ == "__main__":
    write_domain_sets(Path(__file__).resolve().parents[1] / "calibration_data" / "contracts")
