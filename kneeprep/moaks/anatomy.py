"""MOAKS vocabulary: the 69-question bank of 3DReasonKnee, grade components, and the sample label map.

These are the facts other modules share (``docs/DOMAIN.md`` gives the sources). The question ids, finding
types and answer keys follow the published question bank; the *box region* a question gets is a recipe
choice (``[questions]`` in a recipe), with :data:`DEFAULT_QUESTION_REGIONS` as the default.

Canonical severity: every graded answer becomes a list of ``(finding, region, component, grade)`` where
``finding`` is one of :data:`FINDINGS`, ``region`` a lower-case spaced name (``"femur medial central"``,
``""`` for whole-knee findings) and ``component`` a snake_case name from :data:`COMPONENTS`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

# ----------------------------------------------------------------------------------------------------------
# MOAKS subregions

PATELLA = ("patella medial", "patella lateral")
FEMUR = (
    "femur medial trochlea",
    "femur medial central",
    "femur medial posterior",
    "femur lateral trochlea",
    "femur lateral central",
    "femur lateral posterior",
)
TIBIA = (
    "tibia medial anterior",
    "tibia medial central",
    "tibia medial posterior",
    "tibia lateral anterior",
    "tibia lateral central",
    "tibia lateral posterior",
)
SUBSPINOUS = "tibia subspinous"
#: The 15 BML subregions (questions 1-15), in question order.
BML_REGIONS = PATELLA + FEMUR + TIBIA + (SUBSPINOUS,)
#: The 14 cartilage subregions (questions 16-29): the BML ones without the subspinous region.
CARTILAGE_REGIONS = PATELLA + FEMUR + TIBIA
#: The 12 osteophyte locations (questions 30-41).
OSTEOPHYTE_LOCATIONS = (
    "patella superior",
    "patella inferior",
    "patella medial",
    "patella lateral",
    "femur medial anterior",
    "femur medial central",
    "femur medial posterior",
    "femur lateral anterior",
    "femur lateral central",
    "femur lateral posterior",
    "tibia medial",
    "tibia lateral",
)
EXTRUSION_LOCATIONS = ("medial anterior", "medial medial", "lateral anterior", "lateral lateral")
MENISCUS_PARTS = (
    "medial anterior horn",
    "medial body",
    "medial posterior horn",
    "lateral anterior horn",
    "lateral body",
    "lateral posterior horn",
)
PERIARTICULAR = (
    "pes anserine bursitis",
    "iliotibial band signal",
    "popliteal cyst",
    "infrapatellar bursitis",
    "prepatellar bursitis",
    "ganglion cyst",
    "loose bodies",
)

# ----------------------------------------------------------------------------------------------------------
# Findings and their grade components

#: finding -> coarse family used for per-family accuracy tables.
FINDINGS: dict[str, str] = {
    "bml": "bml",
    "cartilage": "cartilage",
    "osteophyte": "osteophyte",
    "hoffa_synovitis": "synovitis",
    "effusion_synovitis": "effusion",
    "meniscal_extrusion": "meniscus",
    "meniscal_morphology": "meniscus",
    "meniscal_cyst": "meniscus",
    "meniscal_hypertrophy": "meniscus",
    "meniscal_root_tear": "meniscus",
    "ligament": "ligament",
    "periarticular": "periarticular",
}

#: canonical component name -> (published key spelling, maximum grade). Grades run 0..max.
COMPONENTS: dict[str, tuple[str, int]] = {
    "bml_size": ("Size of BML (including cyst)", 3),
    "bml_number": ("Number of BML within subregion", 3),
    "bml_percent": ("% of lesion that is BML (excluding cyst)", 3),
    "cartilage_size": ("Size of lesion", 3),
    "cartilage_depth": ("Depth of lesion", 3),
    "grade": ("grade", 3),
    "morphology": ("morphology", 8),
    "presence": ("presence", 1),
    "tear_location": ("tear_location", 3),
    "complete_tear": ("Complete Tear", 1),
    "insertion_bml_cyst": ("Associated with BML/cyst at site of insertion or origin", 1),
    "acl_repair": ("ACL Repair", 1),
    "signal_abnormality": ("Signal Abnormality", 1),
}


@dataclass(frozen=True)
class Question:
    """One question of the bank.

    ``answer_key`` is the key inside the answer JSON as the published bank spells it (``"femur medial
    central BML"``, ``"medial meniscus anterior extrusion"``); ``components`` the
    canonical component names the answer grades; ``wrapper`` the top-level key the published answers use
    for this question (``"MOAKS_scores"``, ``"MOAKS_grade"`` or ``None`` when absent); ``bare_grade`` is
    true when the published answer gives the grade as a bare integer rather than ``{"grade": n}``.
    """

    id: str
    finding: str
    region: str
    answer_key: str
    components: tuple[str, ...]
    wrapper: str | None = "MOAKS_scores"
    bare_grade: bool = False

    @property
    def family(self) -> str:
        return FINDINGS[self.finding]


def _build_bank() -> dict[str, Question]:
    qs: list[Question] = []

    def add(**kw):
        qs.append(Question(id=str(len(qs) + 1), **kw))

    for r in BML_REGIONS:
        add(
            finding="bml",
            region=r,
            answer_key=f"{r} BML",
            components=("bml_size", "bml_number", "bml_percent"),
        )
    for r in CARTILAGE_REGIONS:
        add(
            finding="cartilage",
            region=r,
            answer_key=f"{r} cartilage lesion",
            components=("cartilage_size", "cartilage_depth"),
        )
    for r in OSTEOPHYTE_LOCATIONS:
        add(finding="osteophyte", region=r, answer_key=f"{r} osteophyte", components=("grade",))
    add(finding="hoffa_synovitis", region="", answer_key="Hoffa-Synovitis", components=("grade",))
    add(finding="effusion_synovitis", region="", answer_key="effusion-synovitis", components=("grade",))
    for r in EXTRUSION_LOCATIONS:
        side, loc = r.split()
        add(
            finding="meniscal_extrusion",
            region=r,
            answer_key=f"{side} meniscus {loc} extrusion",
            components=("grade",),
            bare_grade=True,
        )
    for r in MENISCUS_PARTS:
        side, part = r.split()[:2]
        add(
            finding="meniscal_morphology",
            region=r,
            answer_key=f"{side} meniscus {part} morphology",
            components=("morphology",),
        )
    for side in ("medial", "lateral"):
        add(
            finding="meniscal_cyst",
            region=f"{side} meniscus",
            answer_key=f"{side}_meniscal_cyst",
            components=("presence", "tear_location"),
        )
    for side in ("medial", "lateral"):
        add(
            finding="meniscal_hypertrophy",
            region=f"{side} meniscus",
            answer_key=f"{side}_meniscal_hypertrophy",
            components=("presence",),
        )
    for side in ("medial", "lateral"):
        add(
            finding="meniscal_root_tear",
            region=f"{side} meniscus",
            answer_key=f"{side}_meniscal_root_tear",
            components=("presence",),
        )
    add(
        finding="ligament",
        region="acl",
        answer_key="ACL",
        components=("complete_tear", "insertion_bml_cyst", "acl_repair"),
    )
    add(
        finding="ligament", region="pcl", answer_key="PCL", components=("complete_tear", "insertion_bml_cyst")
    )
    add(
        finding="ligament",
        region="patellar tendon",
        answer_key="Patellar_Tendon",
        components=("signal_abnormality",),
    )
    for r in PERIARTICULAR:
        add(
            finding="periarticular",
            region=r,
            answer_key=r.replace(" ", "_") + "_presence",
            components=("presence",),
        )

    bank = {q.id: q for q in qs}
    # Quirks of the published answer JSON (DOMAIN.md, and the published question bank
    # rajpurkarlab/3DReasonKnee data/question_files): other wrappers on a few ids, none from 54 on,
    # and a bare extrusion grade only on 44 and 45 (46 and 47 use {"grade": n}).
    for qid in ("45", "51", "52"):
        bank[qid] = _replace(bank[qid], wrapper="MOAKS_grade")
    for qid in ("33", "35", "37", *map(str, range(54, 70))):
        bank[qid] = _replace(bank[qid], wrapper=None)
    for qid in ("46", "47"):
        bank[qid] = _replace(bank[qid], bare_grade=False)
    return bank


def _replace(q: Question, **changes) -> Question:
    return replace(q, **changes)


#: The question bank: string id "1".."69" -> :class:`Question`.
QUESTIONS: dict[str, Question] = _build_bank()
assert len(QUESTIONS) == 69, len(QUESTIONS)  # internal invariant of this table, not user input


def find_question(answer_key: str) -> Question | None:
    """The question whose answer key matches ``answer_key`` (spaces/underscores and case ignored)."""
    return _BY_KEY.get(_norm_key(answer_key))


def _norm_key(s: str) -> str:
    return " ".join(s.replace("_", " ").replace("-", " ").lower().split())


_BY_KEY = {_norm_key(q.answer_key): q for q in QUESTIONS.values()}

# ----------------------------------------------------------------------------------------------------------
# The sample's label map (what ``kneeprep synth`` writes) and its region groups.
# Real masks may use other maps: the recipe's [labels] table is what the pipeline reads.

#: The sample's cartilage plates.
CARTILAGE_PLATES = (
    "patellar cartilage",
    "femoral cartilage medial",
    "femoral cartilage lateral",
    "femoral cartilage trochlear",
    "tibial cartilage medial",
    "tibial cartilage lateral",
)

SAMPLE_LABELS: dict[int, str] = {
    i + 1: name
    for i, name in enumerate(
        BML_REGIONS
        + CARTILAGE_PLATES
        + tuple(f"{p.split()[0]} meniscus {' '.join(p.split()[1:])}" for p in MENISCUS_PARTS)
        + ("joint effusion", "hoffa fat pad", "acl", "pcl", "patellar tendon")
        # MOAKS subregions cover the epiphyses; the rest of each bone in the field of view is its shaft.
        + ("femur shaft", "tibia shaft")
    )
}

#: region name -> label names; every label is also a region of its own name.
SAMPLE_REGION_GROUPS: dict[str, tuple[str, ...]] = {
    "patella": PATELLA,
    "femur": FEMUR + ("femur shaft",),
    "tibia": TIBIA + (SUBSPINOUS, "tibia shaft"),
    "tibia medial": ("tibia medial anterior", "tibia medial central", "tibia medial posterior"),
    "tibia lateral": ("tibia lateral anterior", "tibia lateral central", "tibia lateral posterior"),
    "medial meniscus": (
        "medial meniscus anterior horn",
        "medial meniscus body",
        "medial meniscus posterior horn",
    ),
    "lateral meniscus": (
        "lateral meniscus anterior horn",
        "lateral meniscus body",
        "lateral meniscus posterior horn",
    ),
    "femoral cartilage": (
        "femoral cartilage medial",
        "femoral cartilage lateral",
        "femoral cartilage trochlear",
    ),
    "tibial cartilage": ("tibial cartilage medial", "tibial cartilage lateral"),
}

_OSTEOPHYTE_BOX = {
    "patella superior": "patella",
    "patella inferior": "patella",
    "patella medial": "patella medial",
    "patella lateral": "patella lateral",
    "femur medial anterior": "femur medial trochlea",
    "femur lateral anterior": "femur lateral trochlea",
    "femur medial central": "femur medial central",
    "femur lateral central": "femur lateral central",
    "femur medial posterior": "femur medial posterior",
    "femur lateral posterior": "femur lateral posterior",
    "tibia medial": "tibia medial",
    "tibia lateral": "tibia lateral",
}
_EXTRUSION_BOX = {
    "medial anterior": "medial meniscus anterior horn",
    "medial medial": "medial meniscus body",
    "lateral anterior": "lateral meniscus anterior horn",
    "lateral lateral": "lateral meniscus body",
}


def _default_region(q: Question) -> str | None:
    if q.finding in ("bml", "cartilage"):
        return q.region
    if q.finding == "osteophyte":
        return _OSTEOPHYTE_BOX[q.region]
    if q.finding == "hoffa_synovitis":
        return "hoffa fat pad"
    if q.finding == "effusion_synovitis":
        return "joint effusion"
    if q.finding == "meniscal_extrusion":
        return _EXTRUSION_BOX[q.region]
    if q.finding == "meniscal_morphology":
        side, *part = q.region.split()
        return f"{side} meniscus {' '.join(part)}"
    if q.finding.startswith("meniscal_"):
        return q.region
    if q.finding == "ligament":
        return q.region
    return None  # periarticular findings: no structure in the masks to box


#: question id -> the region whose box the question gets (None: the masks cannot provide one).
DEFAULT_QUESTION_REGIONS: dict[str, str | None] = {qid: _default_region(q) for qid, q in QUESTIONS.items()}
