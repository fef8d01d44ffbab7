"""Alt-text cleaning, the stages' validation interface (fusion.rejection_reason / tidy_output), fallbacks.

Pure functions only: the checks themselves are tested in test_validation.py, the stage steps
around them with the stages.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from vecap import fusion

ALT = "Nike Air Max 90 sneakers in Paris"
VLM = "A pair of white and red running shoes on a grey street."


def test_clean_alt_text():
    assert fusion.clean_alt_text("Tom &amp; Jerry <b>cartoon</b>") == "Tom & Jerry cartoon"
    assert fusion.clean_alt_text("IMG_1234.jpg") == ""
    assert fusion.clean_alt_text("see https://example.com/x?y=1 for Kyoto temple") == "see for Kyoto temple"
    assert fusion.clean_alt_text("Golden retriever on a beach Stock Photo - Alamy") == "Golden retriever on a beach"
    assert fusion.clean_alt_text("  lots\n\tof   space  ") == "lots of space"
    assert fusion.clean_alt_text("word " * 500, max_words=10) == " ".join(["word"] * 10)
    assert fusion.clean_alt_text(None) == "" and fusion.clean_alt_text("") == ""
    assert fusion.clean_alt_text("東京タワーの夜景 🗼") == "東京タワーの夜景 🗼"
    # one cleaned form: entities unescaped, mojibake repaired (ftfy), camera file names are no alt-text
    assert fusion.clean_alt_text("Ben &amp;amp; Jerry&#39;s") == "Ben & Jerry's"
    assert fusion.clean_alt_text("CafÃ© de Flore, Paris") == "Café de Flore, Paris"
    assert fusion.clean_alt_text("IMG_4471.png") == "" and fusion.clean_alt_text("PXL_20230514_101010123") == ""
    assert fusion.clean_alt_text("DSC01234 Lake Bled") == "Lake Bled"
    for raw in ("Tom &amp; Jerry <b>cartoon</b>", "CafÃ© de Flore", "IMG_1234.jpg Lake Bled"):
        once = fusion.clean_alt_text(raw)
        assert fusion.clean_alt_text(once) == once  # idempotent: every reader may clean again


def test_entities_names_and_numbers():
    """fusion's entities are the validator's (one definition: vecap.validation.measures)."""
    ents = fusion.entities("Nike Air Max 90 sneakers in Paris, 2019")
    assert {"Nike Air Max", "90", "Paris", "2019"} <= set(ents)
    assert "sneakers" not in ents
    assert fusion.kept_entities(ALT, "Nike shoes in Paris") == (1, 3)  # a name is kept with half its words
    assert fusion.kept_entities(ALT, "Nike Air Max 90 shoes in Paris") == (3, 3)


LONG = (
    "White and red Nike Air Max 90 sneakers on a grey street in Paris, their laces loosely tied, soles scuffed "
    "from long walks, beside a puddle that mirrors pale clouds, while pigeons peck at crumbs near a green bench, "
    "cyclists pass a bakery with striped awnings, a woman in a yellow coat carries flowers across the crossing, "
    "old stone facades with iron balconies rise behind bare plane trees, a scooter leans against a lamppost, "
    "chalk drawings fade on the pavement and a waiter sets out small round tables under a burgundy canopy."
)
INSTRUCTIONS = yaml.safe_load((Path(__file__).parent / "data" / "validation_cases.yaml").read_text())["instructions"]


def _reason(output, finish="stop", alt=ALT, vlm=VLM, **kw):
    instructions = INSTRUCTIONS
    return fusion.rejection_reason(
        output, finish_reason=finish, alt_text=alt, vlm_caption=vlm, instructions=instructions, **kw
    )


@pytest.mark.parametrize(
    "output,finish,reason",
    [
        ("", "stop", "empty"),
        ("   ", "stop", "empty"),
        ("I'm sorry, but I cannot help with that request.", "stop", "refusal"),
        ("As an AI language model I can't see images.", "stop", "refusal"),
        ("Web text: Nike Air Max 90 sneakers in Paris", "stop", "echo"),
        ("<web_text>Nike Air Max 90 in Paris</web_text>", "stop", "echo"),
        ("keep every such name and number it gives. Nike Paris", "stop", "echo"),
        ("White Nike Air Max 90 sneakers on a street in Paris and", "length", "truncated"),
        ("Nike \x00\x01\x02\x03\x04\x05\x06\x07\x08 Paris", "stop", "garbage"),
        ("Nike 12345 67890 !!!! #### $$$$ %%%% ^^^^ &&&& ****", "stop", "garbage"),
        (" ".join(["Nike sneakers in Paris"] * 30), "stop", "repetition"),
        (LONG, "stop", "too_long"),
        ("A pair of white and red running shoes on a grey street.", "stop", "lost_entities"),
        ("Here is a poem about the sea, the waves and the moon.", "stop", "lost_entities"),
    ],
)
def test_each_rejection_reason(output, finish, reason):
    assert reason in fusion.REASONS
    assert _reason(output, finish) == reason


def test_good_fusion_is_accepted():
    assert _reason("White and red Nike Air Max 90 sneakers on a grey street in Paris.") is None
    # no entities in the alt-text: nothing to lose
    assert _reason("Red shoes on a street.", alt="some shoes") is None


def test_rejection_reason_keeps_its_keywords():
    lost = "A pair of white and red running shoes on a grey street in the city."
    assert _reason(lost) == "lost_entities"
    assert _reason(lost, require_entities=False) is None
    long = "White and red Nike Air Max 90 sneakers on a grey street in Paris, seen from above."
    assert _reason(long, max_words=10) == "too_long" and _reason(long, max_words=40) is None


def test_tidy_output_strips_wrappers():
    assert fusion.tidy_output('Here is the caption: "Nike shoes in Paris."') == "Nike shoes in Paris."
    assert fusion.tidy_output("Nike shoes in Paris.\n\nI hope this helps!") == "Nike shoes in Paris."


def test_fallback_chain():
    assert fusion.fall_back(ALT, VLM, "refusal") == fusion.Fused(VLM, "vlm", "refusal")
    assert fusion.fall_back(ALT, "", "refusal") == fusion.Fused(ALT, "alt", "refusal")
    assert fusion.fall_back("", "", "empty") == fusion.Fused(None, None, "empty")
    assert fusion.pre_decision("", VLM) == fusion.Fused(VLM, "vlm", "no_alt_text")
    assert fusion.pre_decision(ALT, "") == fusion.Fused(ALT, "alt", "no_vlm_caption")
    assert fusion.pre_decision(ALT, VLM) is None
