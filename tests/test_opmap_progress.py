"""The bar tells the story: failures in the postfix as they happen, a summary at the end."""

from __future__ import annotations

import io
import warnings

import pytest

import worker_helpers as wh
from opero import ConfigurationError, opmap, set_testing
from opero._map import progress as _progress

tqdm = pytest.importorskip("tqdm")


class _Captured:
    """What the bar wrote on stderr (captured by pytest)."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys
        self.text = ""

    def getvalue(self) -> str:
        self.text += self.capsys.readouterr().err
        return self.text


@pytest.fixture
def stderr(capsys):
    """Return what the code under test writes on stderr, where the bar goes."""
    return _Captured(capsys)


def _run(f, items):
    """Call the map, ignoring its failure warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return f(items)


@pytest.mark.parametrize("mode", ["thread", "process", "async_process"])
def test_postfix_and_summary_count_failures(stderr, mode):
    """The bar's postfix shows the failures and the summary line counts done and failed items."""
    if mode == "async_process":
        pytest.importorskip("aiomultiprocess")
    fn = wh.fail_thirds if mode != "async_process" else wh.aboom
    f = opmap(mode=mode, workers=2, chunksize=3, retries=0, progress="force")(fn)
    _run(f, range(12))
    text = stderr.getvalue()
    failed = 4 if mode != "async_process" else 1
    assert f"failed={failed} retried=0" in text
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"opmap {fn.__qualname__}: 12 done, {failed} failed, 0 cached in ")
    assert last.endswith(" s")


def test_async_mode_counts_failures(stderr):
    """In async mode each failed coroutine is counted in the postfix and the summary."""
    f = opmap(mode="async", workers=4, retries=0, progress="force")(wh.aboom)
    _run(f, range(5))
    text = stderr.getvalue()
    assert "failed=1" in text
    assert "opmap aboom: 5 done, 1 failed, 0 cached in " in text


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_summary_counts_cache_hits(stderr, mode):
    """The second map over the same items reports them as cached."""
    f = opmap(mode=mode, workers=2, retries=0, progress="force", cache=True)(wh.boom)
    _run(f, [1, 3, 4])
    _run(f, [1, 3, 4, 5])
    summaries = [line for line in stderr.getvalue().splitlines() if line.startswith("opmap ")]
    assert summaries[0].startswith("opmap boom: 3 done, 0 failed, 0 cached in ")
    assert summaries[1].startswith("opmap boom: 4 done, 0 failed, 3 cached in ")


@pytest.mark.parametrize("mode", ["thread", "process", "async"])
def test_postfix_and_summary_count_retries(stderr, tmp_path, mode):
    """Retries made inside each item (in a worker process too) reach the postfix and summary."""
    fn = wh.aflaky_path if mode == "async" else wh.flaky_path
    seen = []
    f = opmap(mode=mode, workers=2, chunksize=2, retries=2, progress="force", on_retry=seen.append)(
        fn
    )
    with set_testing():
        assert _run(f, [(str(tmp_path), x) for x in range(6)]) == list(range(6))
    text = stderr.getvalue()
    assert "failed=0 retried=6" in text
    assert "opmap " + fn.__qualname__ + ": 6 done, 0 failed, 0 cached, 6 retries in " in text
    if mode != "process":  # the user's on_retry still runs (in the workers, for processes)
        assert len(seen) == 6


def test_user_on_retry_is_kept_without_progress(tmp_path):
    """With progress=False the user's on_retry is passed to @opero untouched."""
    seen = []

    def on_retry(exc: BaseException) -> None:
        seen.append(exc)

    f = opmap(mode="thread", workers=1, retries=1, progress=False, on_retry=on_retry)(wh.flaky_path)
    with set_testing():
        assert _run(f, [(str(tmp_path), 1)]) == [1]
    assert len(seen) == 1
    assert f.item_function.__opero__.policy.options["on_retry"] is on_retry


def test_bad_on_retry_is_still_rejected():
    """A non-callable on_retry is a ConfigurationError even when progress counts retries."""
    with pytest.raises(ConfigurationError, match="on_retry"):
        opmap(mode="thread", progress="force", on_retry=5)(wh.boom)


def test_no_bar_no_summary(stderr):
    """With progress=False nothing is written, failures or not."""
    f = opmap(mode="thread", workers=2, retries=0, progress=False)(wh.fail_thirds)
    _run(f, range(9))
    assert stderr.getvalue() == ""


def test_postfix_refreshes_at_most_every_quarter_second():
    """A burst of failures refreshes the postfix once; the next refresh waits POSTFIX_EVERY."""
    now = [100.0]
    out = io.StringIO()
    bar = _progress.StoryBar(
        tqdm.tqdm(total=10, file=out, mininterval=0), "job", clock=lambda: now[0]
    )
    for _ in range(5):
        bar.update(1)
        bar.fail(1)
        bar.retry(2)
    assert "failed=1 retried=0" in out.getvalue()
    assert "failed=5" not in out.getvalue()
    now[0] += _progress.POSTFIX_EVERY
    bar.update(1)
    bar.fail(1)
    assert "failed=6 retried=10" in out.getvalue()
    now[0] += 2.5
    bar.close()
    assert (
        out.getvalue()
        .rstrip()
        .endswith("opmap job: 6 done, 6 failed, 0 cached, 10 retries in 2.8 s")
    )
