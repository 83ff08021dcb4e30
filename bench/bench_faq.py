"""FAQ reader benchmark: `parse_faq` next to a raw python-calamine read of the same workbook.

Run: `.venv/bin/python bench/bench_faq.py [--rows 2000 20000 100000] [--repeats 5] [--seconds 3]`
(xlsxwriter comes with the `test` extra). The workbooks are generated into a temp dir with shared
strings, as Excel saves them. Prints one table of medians (wall-clock time, and CPU time of the
process's threads, which other load on the machine disturbs less) and of the best round; nothing is
asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT_ROOT))

import python_calamine  # noqa: E402

from embedding_assets.lib.faq import parse_faq  # noqa: E402
from embedding_assets_tests.conftest import HEADER  # noqa: E402

CATEGORIES = ["Карты", "Переводы и платежи", "Кредиты", "Вклады и накопления", "Мобильный банк и онлайн"]


def write_workbook(path: Path, rows: int) -> Path:
    """A FAQ of `rows` templates; every 7th has no audience and every 5th answer has two lines, as real sheets do."""
    import xlsxwriter

    book = xlsxwriter.Workbook(str(path))
    sheet = book.add_worksheet("FAQ")
    sheet.write_row(0, 0, HEADER)
    for n in range(1, rows + 1):
        sheet.write_row(
            n,
            0,
            [
                f"T-{n:06d}",
                CATEGORIES[n % len(CATEGORIES)],
                f"Подкатегория {n % 97}",
                f"Как изменить лимит операции номер {n} в мобильном приложении?",
                ("высокий", "средний", "низкий")[n % 3],
                "" if n % 7 == 0 else "все клиенты",
                f"Откройте приложение, выберите карту {n} и раздел «Лимиты»;{chr(10) if n % 5 == 0 else ' '}"
                "изменения действуют сразу, а уведомление придёт в течение минуты.",
            ],
        )
    book.close()
    return path


def raw_read(path: Path) -> int:
    with python_calamine.CalamineWorkbook.from_path(str(path)) as book:
        return len(book.get_sheet_by_index(0).to_python(skip_empty_area=False))


def openpyxl_read(path: Path) -> int:
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    count = sum(1 for _ in book.worksheets[0].iter_rows(values_only=True))
    book.close()
    return count


def seconds(function, path: Path) -> float:
    started = time.perf_counter()
    function(path)
    return time.perf_counter() - started


def timed(function, path: Path) -> tuple[float, float]:
    """Wall-clock and CPU seconds of one call."""
    started, cpu = time.perf_counter(), time.process_time()
    function(path)
    return time.perf_counter() - started, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[2000, 20000, 100000])
    parser.add_argument("--repeats", type=int, default=5, help="at least this many rounds per size")
    parser.add_argument("--seconds", type=float, default=3.0, help="more rounds until a size has taken this long")
    parser.add_argument("--openpyxl-up-to", type=int, default=20000, help="also time openpyxl (read-only) up to this size")
    args = parser.parse_args()
    print(
        "| rows | parse_faq | raw python-calamine read | parse_faq / raw | CPU: parse_faq / raw "
        "| best of the rounds: parse_faq / raw | openpyxl read-only |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as directory:
        for rows in args.rows:
            path = write_workbook(Path(directory) / f"faq-{rows}.xlsx", rows)
            assert len(parse_faq(path)) == rows and raw_read(path) == rows + 1
            ours: list[tuple[float, float]] = []
            raw: list[tuple[float, float]] = []
            started = time.perf_counter()
            # Interleaved rounds, so load on the machine hits both alike; a small file gets more of them.
            while len(ours) < args.repeats or time.perf_counter() - started < args.seconds:
                ours.append(timed(parse_faq, path))
                raw.append(timed(raw_read, path))
            (ours_s, ours_cpu), (raw_s, raw_cpu) = (map(statistics.median, zip(*times)) for times in (ours, raw))
            cpu = f"{ours_cpu:.3f} s / {raw_cpu:.3f} s = {ours_cpu / raw_cpu:.2f}×"
            best_ours, best_raw = min(wall for wall, _ in ours), min(wall for wall, _ in raw)
            best = f"{best_ours:.3f} s / {best_raw:.3f} s = {best_ours / best_raw:.2f}× ({len(ours)} rounds)"
            peer = f"{seconds(openpyxl_read, path):.2f} s" if rows <= args.openpyxl_up_to else "–"
            print(
                f"| {rows:,} | {ours_s:.3f} s | {raw_s:.3f} s | {ours_s / raw_s:.2f}× | {cpu} | {best} | {peer} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
