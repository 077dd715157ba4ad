"""The paper's corpora as data-domain configs, and the built-in domains standing for them.

Hub ids are the commonly used ones (the paper names none). ChemPile-Education has one
config per sub-source; the paper treats ChemPile as one domain with 0.3B-token pools, which
no single sub-source approaches, so every config is read ("*"). docs/science.md gives the
reasoning and the alternative (chempile-paper).
"""

REAL = {
    "c4": dict(source="hf:allenai/c4", name="c4", text="text", options={"config": "en"}),
    "musicpile": dict(source="hf:m-a-p/MusicPile", name="musicpile", text="text", options={}),
    "chempile": dict(
        source="hf:jablonkagroup/chempile-education",
        name="chempile",
        text="text",
        options={"config": "*"},
    ),
    "flan": dict(source="hf:Muennighoff/flan", name="flan", text="{inputs}\n{targets}", options={}),
}

# Built-in stand-ins (CPU smoke runs, tests): same roles, no network.
BUILTIN = {
    "c4": dict(source="builtin:prose", name="prose", text="text", options={}),
    "musicpile": dict(source="builtin:music", name="music", text="text", options={}),
    "chempile": dict(source="builtin:chem", name="chem", text="text", options={}),
    "flan": dict(source="builtin:instruct", name="instruct", text="text", options={}),
}

# D_post -> D_ft pipelines of the paper (D_pre is always C4).
PIPELINES = {
    "musicpile-chempile": ("musicpile", "chempile"),
    "musicpile-flan": ("musicpile", "flan"),
    "flan-chempile": ("flan", "chempile"),
    "flan-musicpile": ("flan", "musicpile"),
}


def set_pipeline(c, pipeline: str, smoke: bool) -> None:
    """Fills c.data.pre/.post/.ft for `pipeline`, real corpora or built-in stand-ins."""
    if pipeline not in PIPELINES:
        raise ValueError(f"pipeline {pipeline!r} unknown; allowed: {sorted(PIPELINES)}")
    table = BUILTIN if smoke else REAL
    post, ft = PIPELINES[pipeline]
    c.data.pre, c.data.post, c.data.ft = table["c4"], table[post], table[ft]


def parse_arg(
    arg: str, first: tuple[str, ...], arms: tuple[str, ...] = ()
) -> tuple[str, str, bool]:
    """'NAME[,ARM][,smoke]' -> (NAME, ARM or arms[0], smoke); NAME in `first`, ARM in `arms`."""
    parts = [p for p in arg.split(",") if p]
    smoke = "smoke" in parts
    names = [p for p in parts if p != "smoke" and p not in arms]
    chosen = [p for p in parts if p in arms]
    if len(names) != 1 or names[0] not in first or len(chosen) > 1:
        allowed = f"NAME one of {list(first)}" + (f"; ARM one of {list(arms)}" if arms else "")
        form = "NAME[,ARM][,smoke]" if arms else "NAME[,smoke]"
        raise ValueError(f"config argument {arg!r}: expected {form}; {allowed}")
    return names[0], (chosen[0] if chosen else (arms[0] if arms else "")), smoke


def get_config(arg: str = ""):
    """Refuses to run: this file names corpora for the experiment configs, it is not one."""
    del arg
    raise ValueError(
        "configs/corpora.py names the corpora the experiment configs read; it is not an "
        "experiment. Run one of: configs/default.py, configs/paper_135m.py:PIPELINE, "
        f"configs/1b_early_exposure.py:PIPELINE (PIPELINE one of {sorted(PIPELINES)})"
    )
