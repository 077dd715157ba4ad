"""Built-in domains: deterministic, unbounded document generators standing for the paper's corpora.

Document i of a domain is a pure function of (domain, options["seed"], i), so sources
are random access and identical on every machine. Each is small enough for a ~1M-param
model to learn in ~1M byte tokens, and the four differ in characters, words and structure:

  prose     stands for C4: lowercase English-like sentences from a small Zipf vocabulary.
  music     stands for MusicPile: ABC-notation tunes (header fields, bars that add up to
            the meter, stepwise melodies in the tune's key, repeats).
  chem      stands for ChemPile: formulas, balanced combustion reactions, molar masses
            computed from atomic weights, and short descriptive sentences.
  instruct  stands for FLAN: templated "input -> target" pairs (reverse, sort, add,
            count, plural, ...); the document text is "{inputs}\n{targets}".

Options (`c.data.<domain>.options`):
  seed      content seed (default 0); not the experiment seed, so content is fixed.
  overlap   in [0, 1] (default 0): probability that each line of a music, chem or
            instruct document is replaced by a prose sentence, and that instruct/chem
            words come from the prose vocabulary: the knob for how much domains share.
"""

import random

from retention_jax.errors import fail

NAMES = ("prose", "music", "chem", "instruct")
OPTIONS = {"seed", "overlap"}
VERSION = "builtin-v1"


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words(
    """
    river city garden teacher window market letter child forest morning road house
    friend village story machine country paper winter table bridge doctor harbor
    mountain student kitchen farmer evening island lamp coat
    """
)
_VERBS = _words(
    """
    finds keeps opens carries watches builds follows remembers crosses paints leaves
    reaches brings holds answers visits
    """
)
_ADJS = _words(
    """
    old small quiet bright long green cold early heavy gentle narrow warm empty distant
    simple
    """
)
_ADVS = _words(
    """
    slowly often never always quickly rarely softly again
    """
)
_PREPS = _words(
    """
    near behind under across beside through
    """
)


def _zipf(rng: random.Random, words) -> str:
    # index ~ floor(n * u^2): a skewed, learnable frequency profile
    return words[int(len(words) * rng.random() ** 2)]


def prose_sentence(rng: random.Random) -> str:
    n1, n2 = _zipf(rng, _NOUNS), _zipf(rng, _NOUNS)
    form = rng.randrange(4)
    if form == 0:
        s = f"the {_zipf(rng, _ADJS)} {n1} {_zipf(rng, _VERBS)} the {n2}"
    elif form == 1:
        s = f"a {n1} {_zipf(rng, _ADVS)} {_zipf(rng, _VERBS)} the {_zipf(rng, _ADJS)} {n2}"
    elif form == 2:
        s = f"the {n1} {_zipf(rng, _VERBS)} a {n2} {_zipf(rng, _PREPS)} the {_zipf(rng, _NOUNS)}"
    else:
        s = f"every {n1} {_zipf(rng, _VERBS)} the {n2}, and the {n2} {_zipf(rng, _VERBS)} it"
    return s[0].upper() + s[1:] + "."


def _prose(rng: random.Random, opts) -> str:
    paras = []
    for _ in range(rng.randint(1, 3)):
        paras.append(" ".join(prose_sentence(rng) for _ in range(rng.randint(3, 7))))
    return "\n".join(paras)


_KEYS = {  # key -> its scale over about two octaves, in ABC note names
    "C": "C D E F G A B c d e f g a b",
    "G": "G A B c d e ^f g a b",
    "D": "D E ^F G A B ^c d e ^f g a",
    "F": "F G A _B c d e f g a _b",
    "Am": "A B c d e f g a b",
    "Em": "E ^F G A B c d e ^f g",
}
_TITLE_WORDS = _words(
    """
    reel jig dance air morning hill shore lark rover maid piper lament
    """
)
_METERS = {"4/4": 8, "3/4": 6, "6/8": 6, "2/4": 4}


def _scale_notes(key: str) -> list[str]:
    return _KEYS[key].split()


def _music(rng: random.Random, opts) -> str:
    key = rng.choice(sorted(_KEYS))
    meter = rng.choice(sorted(_METERS))
    bar_len = _METERS[meter]
    scale = _scale_notes(key)
    title = " ".join(w.capitalize() for w in rng.sample(_TITLE_WORDS, 2))
    lines = [
        f"X:{rng.randint(1, 400)}",
        f"T:The {title}",
        f"M:{meter}",
        "L:1/8",
        f"Q:1/4={rng.choice((96, 108, 120, 132))}",
        f"K:{key}",
    ]
    pos = rng.randrange(len(scale))
    for _ in range(rng.randint(2, 4)):
        if rng.random() < opts["overlap"]:
            lines.append("% " + prose_sentence(rng))
            continue
        bars = []
        for _ in range(4):
            left, notes = bar_len, []
            while left > 0:
                dur = min(left, rng.choice((1, 1, 1, 2, 2, 3, 4)))
                pos = min(len(scale) - 1, max(0, pos + rng.choice((-2, -1, -1, 0, 1, 1, 2))))
                notes.append(scale[pos] + ("" if dur == 1 else str(dur)))
                left -= dur
            bars.append("".join(notes))
        lines.append("|:" + "|".join(bars) + ":|")
    return "\n".join(lines)


_WEIGHTS = {"H": 1.008, "C": 12.011, "N": 14.007, "O": 15.999, "S": 32.06, "Cl": 35.45}
_PREFIX = ("meth", "eth", "prop", "but", "pent", "hex", "hept", "oct", "non", "dec")
_NAMED = {
    "water": {"H": 2, "O": 1},
    "ammonia": {"N": 1, "H": 3},
    "carbon dioxide": {"C": 1, "O": 2},
    "glucose": {"C": 6, "H": 12, "O": 6},
    "urea": {"C": 1, "H": 4, "N": 2, "O": 1},
    "hydrogen chloride": {"H": 1, "Cl": 1},
    "sulfur dioxide": {"S": 1, "O": 2},
    "nitric acid": {"H": 1, "N": 1, "O": 3},
}


def _formula(atoms: dict) -> str:
    return "".join(f"{el}{'' if n == 1 else n}" for el, n in atoms.items())


def _mass(atoms: dict) -> float:
    return sum(_WEIGHTS[el] * n for el, n in atoms.items())


def _hydrocarbon(rng: random.Random):
    n = rng.randint(1, 10)
    kind = rng.choice(("ane", "ene", "anol") if n > 1 else ("ane", "anol"))
    if kind == "ane":
        atoms = {"C": n, "H": 2 * n + 2}
    elif kind == "ene":
        atoms = {"C": n, "H": 2 * n}
    else:
        atoms = {"C": n, "H": 2 * n + 2, "O": 1}
    return _PREFIX[n - 1] + kind, atoms


def _combustion(name: str, atoms: dict) -> str:
    c, h, o = atoms.get("C", 0), atoms.get("H", 0), atoms.get("O", 0)
    k = 1  # smallest multiple of the fuel that balances with whole O2 molecules
    while (k * (4 * c + h - 2 * o)) % 4 or (k * h) % 2:
        k += 1
    o2 = k * (4 * c + h - 2 * o) // 4

    def term(n, f):
        return f"{'' if n == 1 else n}{f}"

    lhs = f"{term(k, _formula(atoms))} + {term(o2, 'O2')}"
    rhs = f"{term(k * c, 'CO2')} + {term(k * h // 2, 'H2O')}"
    return f"Combustion of {name}: {lhs} -> {rhs}"


def _chem(rng: random.Random, opts) -> str:
    lines = []
    for _ in range(rng.randint(2, 5)):
        if rng.random() < opts["overlap"]:
            lines.append(prose_sentence(rng))
            continue
        if rng.random() < 0.6:
            name, atoms = _hydrocarbon(rng)
        else:
            name, atoms = rng.choice(sorted(_NAMED.items()))
        form = rng.randrange(3)
        if form == 0:
            lines.append(
                f"{name.capitalize()} has the formula {_formula(atoms)}; "
                f"its molar mass is {_mass(atoms):.2f} g/mol."
            )
        elif form == 1 and "C" in atoms and set(atoms) <= {"C", "H", "O"}:
            lines.append(_combustion(name, atoms))
        else:
            parts = ", ".join(f"{n} {el}" for el, n in atoms.items())
            lines.append(f"One molecule of {_formula(atoms)} ({name}) holds {parts}.")
    return "\n".join(lines)


_ITEMS = _words(
    """
    apple tiger violet copper maple falcon ember lotus cobalt willow quartz heron
    """
)


def _instruct(rng: random.Random, opts) -> str:
    pool = _NOUNS if rng.random() < opts["overlap"] else _ITEMS
    words = rng.sample(pool, rng.randint(2, 5))
    task = rng.randrange(6)
    if task == 0:
        w = words[0]
        inp, tgt = f"Reverse the letters of the word '{w}'.", w[::-1]
    elif task == 1:
        inp, tgt = f"Sort these words alphabetically: {', '.join(words)}.", ", ".join(sorted(words))
    elif task == 2:
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        inp, tgt = f"What is {a} plus {b}?", str(a + b)
    elif task == 3:
        w = words[0]
        inp, tgt = f"How many vowels are in '{w}'?", str(sum(ch in "aeiou" for ch in w))
    elif task == 4:
        inp, tgt = f"Write in capitals: {' '.join(words)}", " ".join(words).upper()
    else:
        inp, tgt = (
            f"Give the first letter of each word: {' '.join(words)}",
            "".join(w[0] for w in words),
        )
    if rng.random() < opts["overlap"]:
        inp = prose_sentence(rng) + " " + inp
    return f"Question: {inp}\nAnswer: {tgt}"


_GEN = {"prose": _prose, "music": _music, "chem": _chem, "instruct": _instruct}


def check_options(name: str, options: dict, key: str) -> dict:
    """Options with defaults; a ConfigError naming `key` for unknown names or bad values."""
    if name not in _GEN:
        fail(key.rsplit(".", 1)[0] + ".source", f"builtin:{name}", f"builtin:{' | '.join(NAMES)}")
    bad = set(options) - OPTIONS
    if bad:
        fail(key, dict(options), f"options of builtin:{name} among {sorted(OPTIONS)}")
    opts = {"seed": 0, "overlap": 0.0, **dict(options)}
    if isinstance(opts["seed"], bool) or not isinstance(opts["seed"], int):
        fail(f"{key}.seed", opts["seed"], "an integer")
    if not (isinstance(opts["overlap"], (int, float)) and 0.0 <= opts["overlap"] <= 1.0):
        fail(f"{key}.overlap", opts["overlap"], "a number in [0, 1]")
    return opts


def document(name: str, i: int, opts: dict) -> str:
    """Document i of built-in domain `name` (pure function of name, opts, i)."""
    rng = random.Random(f"{VERSION}:{name}:{opts['seed']}:{i}")
    return _GEN[name](rng, opts)
