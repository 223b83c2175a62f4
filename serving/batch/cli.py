"""``python -m serving.batch``: score a CSV or Parquet table with a packaged ONNX model."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence

from serving.batch import engine
from serving.batch.errors import one_line
from serving.batch.source import FORMATS
from serving.contract.errors import MlrolloutError

EPILOG = """\
input columns are matched to the model card's feature names by name, not position; columns the
model does not use are ignored (and not copied to the output, except the id column). A missing
feature column, or one that cannot be cast to float32, stops the run before any output is written.

output: the id column (--id-column, else 'id' when the input has one, else 'row_number' from 0),
'prediction' (the predicted class label) and one 'prob_<class name>' column per class. The format
follows the output file's extension (.csv or .parquet). The file is written under a temporary name
and renamed into place at the end: a failed or interrupted run leaves no output file behind.

exit status: 0 done, 2 bad arguments, input or model, 130/143 interrupted (SIGINT/SIGTERM), 1 other.
"""

_MAX_LINE = 1000  # an error line quotes file names and third-party messages: keep it one readable line


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line that says what is wrong (not the whole usage block), exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {one_line(message, _MAX_LINE)}; see {self.prog} --help\n")


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(
            f"expected a whole number, 0 or more (0: one thread per physical core), got {text!r}"
        )
    return n


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m serving.batch",
        description="Score a CSV or Parquet table with a packaged ONNX model "
        "(onnxruntime, streamed in chunks).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model_dir",
        "--model-dir",
        dest="model_dir",
        required=True,
        help="model package: <root>, <root>/<name> or <root>/<name>/1 (sha256 is verified)",
    )
    p.add_argument("--input", required=True, help="table to score: *.csv or *.parquet")
    p.add_argument("--output", required=True, help="where to write predictions: *.csv or *.parquet")
    p.add_argument(
        "--chunk-rows",
        "--chunk_rows",
        dest="chunk_rows",
        type=int,
        default=None,
        help="rows per chunk read, scored and written (default: about 2 MB of float32 features, "
        "e.g. 17,476 rows at 30 features; approximate for CSV)",
    )
    p.add_argument(
        "--id-column",
        "--id_column",
        dest="id_column",
        default=None,
        help="input column copied to the output to identify rows (default: 'id' if present, "
        "else a 0-based 'row_number')",
    )
    p.add_argument(
        "--input-format",
        choices=["auto", *FORMATS],
        default="auto",
        help="input format (default: from the extension, else sniffed)",
    )
    p.add_argument(
        "--threads",
        type=_threads,
        default=0,
        help="onnxruntime intra-op threads (default 0: one per physical core)",
    )
    p.add_argument(
        "--no-overwrite",
        dest="overwrite",
        action="store_false",
        help="fail if the output file exists (default: replace it, atomically)",
    )
    p.add_argument(
        "--report",
        default=None,
        help="also write an HTML page with the score distribution and predicted-class counts "
        "(atomically, like the output; it may not be the input or the output file)",
    )
    p.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar (it is also off when stderr is not a terminal); "
        "a one-line summary is printed either way",
    )
    return p


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so clean-up (removing the partial file) runs."""


def _on_sigterm(signum, frame):  # pragma: no cover - exercised by the interrupt test in a subprocess
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show = args.progress and sys.stderr.isatty()
    in_main = threading.current_thread() is threading.main_thread()  # signals only go to the main thread
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main else None
    bar = None
    try:
        # paths first: a wrong --output or --report is refused before the model is loaded
        engine.check_paths(
            args.input,
            args.output,
            overwrite=args.overwrite,
            report_path=args.report,
            chunk_rows=args.chunk_rows,
        )
        model = engine.load_model(args.model_dir, args.threads)
        bar = _progress_bar(f"scoring {model.name}:{model.version}") if show else _NoBar()
        summary = engine.score_file(
            model,
            args.input,
            args.output,
            chunk_rows=args.chunk_rows,
            id_column=args.id_column,
            input_fmt=args.input_format,
            overwrite=args.overwrite,
            progress=bar.update,
            on_open=lambda src: _set_total(bar, src.total_rows),
            report_path=args.report,
        )
        bar.close()
        shares = ", ".join(f"{k}={v}" for k, v in summary.class_counts.items())
        print(f"{summary.line()} [{shares}]", file=sys.stderr)
        return 0
    except MlrolloutError as e:  # BatchScoringError, ModelPackageError
        _close(bar)
        _error(str(e))
        return 2
    except OSError as e:  # unreadable input, unwritable output folder, disk full...
        _close(bar)
        where = f" ({e.filename})" if e.filename else ""
        _error(f"{e.strerror or e}{where}: check the path, its permissions and free space")
        return 2
    except KeyboardInterrupt:
        _close(bar)
        print("interrupted (SIGINT): no output written", file=sys.stderr)
        return 130
    except _Terminated:
        _close(bar)
        print("terminated (SIGTERM): no output written", file=sys.stderr)
        return 143
    finally:
        if in_main:
            signal.signal(signal.SIGTERM, previous)


def _error(message: str) -> None:
    print(f"error: {one_line(message, _MAX_LINE)}", file=sys.stderr)


class _NoBar:
    """What the command uses when no bar is shown: importing tqdm alone costs about 0.08 CPU-s of
    start-up (measured, ``python -X importtime``), a tenth of the command's fixed cost."""

    total = None

    def update(self, n: int) -> None:
        pass

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(desc: str):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=" rows", unit_scale=True, file=sys.stderr)


def _set_total(bar, total: int | None) -> None:
    bar.total = total
    bar.refresh()


def _close(bar) -> None:
    if bar is not None:
        bar.close()
