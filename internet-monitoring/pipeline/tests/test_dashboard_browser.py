"""The operators' dashboard in real headless Chromium against a real server with several
sensors speaking protocol 1.0 over real sockets: one healthy, one whose queue is backing
up (its heartbeats report a deep queue while nothing arrives), one that disconnected.
It checks the fleet status and alerts, the stream token asked once and kept across a
reload within the session, the per-test cards, and a chart that shows stored history and
then a point arriving live. Screenshots are saved as artefacts (path printed)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from pipeline.tests.browser_support import artifacts_dir, chromium_page
from pipeline.tests.server_support import (
    STREAM_TOKEN,
    MiniSensor,
    envelope,
    running_server,
    server_config,
    urls,
)

SENSORS = {"pi-01": "token-pi-01-browser", "pi-02": "token-pi-02-browser",
           "pi-03": "token-pi-03-browser"}


def result(test: str, **fields: float) -> bytes:
    return json.dumps({"test": test, **fields}).encode()


def row(sensor_id: str, expression: str) -> str:
    return (f"(() => {{ const r = document.querySelector('tr.sensor-row[data-sensor-id="
            f"\"{sensor_id}\"]'); return r && !r.hidden && ({expression}); }})()")


async def backing_up_sensor(http: aiohttp.ClientSession, server, stop: asyncio.Event) -> None:
    """pi-02: connected and heartbeating a queue of 5,000 chunks; its uploads never arrive."""
    async with http.ws_connect(urls(server)["control"], headers={
            "X-Sensor-ID": "pi-02", "Authorization": f"Bearer {SENSORS['pi-02']}"}) as ws:
        while not stop.is_set():
            await ws.send_str(envelope("pi-02", "heartbeat", {
                "software_version": "mini-1.0", "last_committed_sequence": 0,
                "queue_depth": 5000, "clock_skew_ms": 0.0}))
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except TimeoutError:
                pass


async def test_fleet_token_and_live_chart_in_chromium(tmp_path, chromium):
    shots = artifacts_dir(tmp_path, "dashboard")
    config = server_config(
        tmp_path, stream={"token": STREAM_TOKEN},
        auth={"sensors": [{"id": sid, "token": tok} for sid, tok in SENSORS.items()]},
        dashboard={"push_interval_s": 1.0, "queue_warning": 100, "queue_critical": 400,
                   "sensors": {"pi-02": {"name": "Warehouse", "site": "Depot North"}}})
    now_ms = int(time.time() * 1000)
    async with running_server(config) as server, aiohttp.ClientSession() as http:
        healthy = MiniSensor(http, server, "pi-01", SENSORS["pi-01"])
        for minutes, mbps in ((50, 310.0), (40, 420.5), (30, 388.0), (20, 512.25), (10, 450.0)):
            healthy.enqueue(result("speed", download_mbps=mbps, upload_mbps=mbps / 4,
                                   latency_ms=12.5), now_ms - minutes * 60_000)
        healthy.enqueue(result("dns", lookup_ms=18.4), now_ms - 60_000)
        healthy.enqueue(result("ping", rtt_ms=7.25, loss_pct=0.0), now_ms - 60_000)
        healthy.enqueue(result("wifi", rssi_dbm=-58), now_ms - 60_000)
        healthy.enqueue(result("web", ttfb_ms=143.0, status=200), now_ms - 60_000)
        await healthy.connect()
        healthy.start_heartbeats(1.0)
        await healthy.drained()
        gone = MiniSensor(http, server, "pi-03", SENSORS["pi-03"])
        gone.enqueue(result("ping", rtt_ms=30.0), now_ms - 120_000)
        await gone.connect()
        await gone.drained()
        await gone.close()
        stop = asyncio.Event()
        backlog = asyncio.create_task(backing_up_sensor(http, server, stop))
        try:
            async with chromium_page(chromium, tmp_path / "profile") as page:
                await page.navigate(urls(server)["ingest"] + "/")
                # The token is asked for; a wrong one is refused and asked again.
                form_shown = ("document.getElementById('token-form')"
                              ".classList.contains('visible')")
                await page.wait_for(form_shown, what="the token form")
                await enter_token(page, "not-the-token")
                await page.wait_for(f"{form_shown} && document.getElementById('stream-status')"
                                    ".textContent === 'token refused'", what="a refusal")
                await enter_token(page, STREAM_TOKEN)
                await wait_fleet(page)
                await page.wait_for("document.getElementById('kpi-availability')"
                                    ".textContent.endsWith('%')", what="the KPI tiles")
                await page.wait_for("document.querySelector("
                                    "'.journey[data-journey=\"speed\"]') !== null",
                                    what="the journeys")
                await page.screenshot(shots / "1-fleet.png")
                # The filter matches sites too.
                await page.evaluate("const f = document.getElementById('filter');"
                                    "f.value = 'depot'; f.dispatchEvent(new Event('input'))")
                assert await page.evaluate(
                    "Array.from(document.querySelectorAll('tr.sensor-row'))"
                    ".filter(r => !r.hidden).map(r => r.dataset.sensorId)") == ["pi-02"]
                # A reload in the same session keeps the token; it is in no URL.
                await page.reload()
                await wait_fleet(page)
                assert not await page.evaluate(
                    "document.getElementById('token-form').classList.contains('visible')")
                assert await page.evaluate(
                    "sessionStorage.getItem('openuxi.streamToken')") == STREAM_TOKEN
                assert STREAM_TOKEN not in await page.evaluate("location.href")
                # The sensor page: a card per test type, a chart of the stored history.
                await page.evaluate("location.hash = '#/sensor/pi-01'")
                await page.wait_for("document.querySelectorAll('.test-card').length === 5",
                                    what="five test cards")
                chart = ("document.querySelector('svg.chart[data-test=\"speed\"]"
                         "[data-field=\"download_mbps\"]')")
                await page.wait_for(f"{chart} && {chart}.dataset.points === '5'",
                                    what="five stored points in the download chart")
                assert await page.evaluate(
                    "document.querySelector('.test-card[data-test=\"speed\"] "
                    "[data-field=\"download_mbps\"] .value').textContent") == "450Mbit/s"
                await page.screenshot(shots / "2-sensor-history.png")
                # A new result arrives through the pipeline: the chart grows live.
                healthy.enqueue(result("speed", download_mbps=777.0, upload_mbps=190.0,
                                       latency_ms=9.0))
                await healthy.heartbeat()
                await healthy.drained()
                await page.wait_for(f"{chart}.dataset.points === '6' && "
                                    f"{chart}.dataset.live === '1'",
                                    what="the live point in the download chart")
                assert await page.evaluate(
                    "document.querySelector('.test-card[data-test=\"speed\"] "
                    "[data-field=\"download_mbps\"] .value').textContent") == "777Mbit/s"
                await page.screenshot(shots / "3-sensor-live.png")
                # The week view: the same six results in hourly points.
                await page.evaluate("document.querySelector('#ranges [data-range=\"604800\"]')"
                                    ".click()")
                await page.wait_for(f"['1', '2'].includes({chart}.dataset.points) && "
                                    f"{chart}.dataset.live === '0'", what="the week view")
        finally:
            stop.set()
            await backlog
            await healthy.close()


async def enter_token(page, token: str) -> None:
    await page.evaluate(f"document.getElementById('stream-token').value = '{token}';"
                        "document.getElementById('token-form').requestSubmit()")


async def wait_fleet(page) -> None:
    await page.wait_for("document.getElementById('stream-status').dataset.state === 'live'",
                        what="the live stream")
    await page.wait_for(row("pi-01", "r.dataset.status === 'ok'"), what="pi-01 ok")
    await page.wait_for(row("pi-02", "r.dataset.status === 'critical' && "
                                     "r.querySelector('.c-queue').textContent === '5000'"),
                        what="pi-02 critical with its queue depth")
    await page.wait_for(row("pi-03", "r.dataset.status === 'offline' && "
                                     "r.querySelector('.c-heartbeat').textContent "
                                     "=== 'disconnected'"), what="pi-03 offline")
    assert await page.evaluate(row("pi-02", "r.querySelector('.c-site').textContent")) \
        == "Depot North"
    alerts = await page.evaluate(
        "Array.from(document.querySelectorAll('#alerts li')).map(li => li.dataset.alertId)")
    assert {"queue:pi-02", "offline:pi-03"} <= set(alerts), alerts
    assert "queue:pi-01" not in alerts


async def test_five_hundred_sensors_filter_sort_and_keep_their_rows(tmp_path, chromium):
    """500 sensors: every row rendered once and reused across polls (no rebuild), the filter
    and the sort work. The time to the first full table is printed, not asserted."""
    shots = artifacts_dir(tmp_path, "dashboard")
    fleet = [{"id": f"s-{n:03d}", "token": f"token-fleet-{n:03d}"} for n in range(500)]
    config = server_config(tmp_path, auth={"sensors": fleet}, dashboard={"push_interval_s": 0})
    async with running_server(config) as server:
        async with chromium_page(chromium, tmp_path / "profile") as page:
            started = time.monotonic()
            await page.navigate(urls(server)["ingest"] + "/")
            await page.wait_for("document.querySelectorAll('tr.sensor-row').length === 500",
                                what="500 rows")
            print(f"500-sensor table rendered in {time.monotonic() - started:.2f}s "
                  "(page load included)")
            await page.evaluate("document.querySelectorAll('tr.sensor-row')"
                                ".forEach(r => { r.__kept = true; })")
            await page.evaluate("const f = document.getElementById('filter');"
                                "f.value = 's-04'; f.dispatchEvent(new Event('input'))")
            assert await page.evaluate(
                "Array.from(document.querySelectorAll('tr.sensor-row'))"
                ".filter(r => !r.hidden).length") == 10
            assert await page.evaluate(
                "document.getElementById('sensor-count').textContent") == "10 of 500 sensors"
            await page.evaluate("document.querySelector('th[data-key=\"sensor_id\"]').click()")
            first = ("Array.from(document.querySelectorAll('tr.sensor-row'))"
                     ".find(r => !r.hidden).dataset.sensorId")
            assert await page.evaluate(first) == "s-049"
            await page.evaluate("document.querySelector('th[data-key=\"sensor_id\"]').click()")
            assert await page.evaluate(first) == "s-040"
            await page.screenshot(shots / "4-fleet-500-filtered.png")
            # The next poll (every 5 s) updates the same row elements.
            polls = int(await page.evaluate("document.body.dataset.polls"))
            await page.wait_for(f"Number(document.body.dataset.polls) > {polls}",
                                timeout=10, what="the next poll")
            assert await page.evaluate(
                "Array.from(document.querySelectorAll('tr.sensor-row'))"
                ".every(r => r.__kept === true)")


async def test_remote_write_series_show_as_a_prometheus_card(tmp_path, chromium):
    """A sensor's remote-write results (snapshot ``series``) appear in one card on its
    page, loaded with the page and then updated live from the stream."""
    from pipeline.common import remote_write as rw

    def rw_result(value: float, ts: int) -> bytes:
        series = rw.Series((("__name__", "probe_success"), ("instance", "https://a.example"),
                            ("sensor", "pi-01")), ((ts, value),))
        return rw.build([series]).SerializeToString()

    config = server_config(tmp_path, auth={"sensors": [{"id": "pi-01",
                                                        "token": SENSORS["pi-01"]}]})
    now_ms = int(time.time() * 1000)
    key = json.dumps('probe_success{instance="https://a.example"}')
    cell = ("(Array.from(document.querySelectorAll('.test-card[data-test=\"prometheus\"]"
            f" tr.field')).find((r) => r.dataset.field === {key}) || {{}}).querySelector")
    value = f"({cell} ? {cell}('.value').textContent : null)"
    async with running_server(config) as server, aiohttp.ClientSession() as http:
        sensor = MiniSensor(http, server, "pi-01", SENSORS["pi-01"])
        sensor.enqueue(rw_result(1.0, now_ms - 2000), now_ms - 2000, attributes={
            rw.CONTENT_TYPE_ATTRIBUTE: rw.EVENT_CONTENT_TYPE})
        await sensor.connect()
        await sensor.drained()
        try:
            async with chromium_page(chromium, tmp_path / "profile") as page:
                await page.navigate(urls(server)["ingest"] + "/#/sensor/pi-01")
                await page.wait_for(f"{value} === '1'",
                                    what="the Prometheus card with the stored sample")
                sensor.enqueue(rw_result(0.0, now_ms), now_ms, attributes={
                    rw.CONTENT_TYPE_ATTRIBUTE: rw.EVENT_CONTENT_TYPE})
                await sensor.heartbeat()
                await sensor.drained()
                await page.wait_for(f"{value} === '0'",
                                    what="the live sample in the Prometheus card")
        finally:
            await sensor.close()
