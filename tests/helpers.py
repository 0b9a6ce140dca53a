"""Small helpers shared by the real-process tests."""

import time


def wait_for(pred, timeout=180, every=0.2):
    """Poll ``pred`` until it is true (True) or ``timeout`` seconds pass (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return True
        time.sleep(every)
    return False
