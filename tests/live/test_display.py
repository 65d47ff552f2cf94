"""The display decision (idle -> preview -> final) as a pure function: no threads, no clocks."""
from __future__ import annotations

from live.display import Memory, Show, Tick, decide


def play(ticks: list[Tick]) -> list[Show | None]:
    memory, shown = Memory(), []
    for tick in ticks:
        show, memory = decide(tick, memory)
        shown.append(show)
    return shown


def tick(playhead: int, latest: int | None = None, n: int = 50, slow: bool = False, kept=()) -> Tick:
    return Tick(playhead=playhead, num_frames=n, latest_final=latest, slow=slow, kept=set(kept))


def test_the_first_preview_frame_is_always_shown_even_when_finals_are_ahead():
    assert play([tick(0, latest=40)])[0] == Show("preview", 0)


def test_a_fast_renderer_takes_over_once_it_is_ahead_of_the_playhead_and_never_gives_back():
    shown = play([tick(0), tick(1, latest=0), tick(2, latest=3), tick(3, latest=3), tick(4, latest=3),
                  tick(5, latest=9)])
    assert shown[1] == Show("preview", 1)  # one final frame says nothing about the renderer's speed yet
    assert shown[2] == Show("final", 3)
    assert shown[3] is None and shown[4] is None  # the same final frame is not sent again, and no preview
    assert shown[5] == Show("final", 9)


def test_the_preview_loops_until_a_final_frame_exists():
    shown = play([tick(i, n=10) for i in range(25)])
    assert [s.index for s in shown] == [i % 10 for i in range(25)]
    assert {s.quality for s in shown} == {"preview"}


def test_after_a_play_through_the_first_finals_take_over_even_behind_the_playhead():
    shown = play([tick(0, n=10), tick(12, n=10, latest=1)])
    assert shown[1] == Show("final", 1)


def test_a_slow_renderer_keeps_the_preview_with_its_kept_finals_in_place():
    kept = {0, 1, 2}
    shown = play([tick(i, latest=2, slow=True, kept=kept, n=6) for i in range(8)])
    assert shown == [Show("final", 0, kept=True), Show("final", 1, kept=True), Show("final", 2, kept=True),
                     Show("preview", 3), Show("preview", 4), Show("preview", 5), Show("final", 0, kept=True),
                     Show("final", 1, kept=True)]
