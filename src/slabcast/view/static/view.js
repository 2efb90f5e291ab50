// slabcast view: the page. One websocket; the server pushes the stream list (status, ~2 Hz)
// and answers one display-frame request at a time. The next request leaves only once the
// last frame is drawn, from requestAnimationFrame: the page draws at the screen's rate and
// never builds a queue. Frame layout: see slabcast/view/frames.py.
"use strict";
(() => {
  const COLORS = ["#1f6fb4", "#c7372f", "#2a9d3c", "#8a55c0", "#e07b10", "#11a3b8", "#8c564b", "#d6529f"];
  // Debug and test hook: the last frame drawn per stream (x, per channel min/max), the last status, and per
  // plotted stream the marker lines drawn over it in its last frame.
  const view = (window.slabcastView = { last: {}, status: null, hello: null, frames: 0, selected: {}, auto: true,
    lines: {} });
  const markers = new Map(); // marker stream name -> [[time, text], ...] of its last frame
  const token = new URLSearchParams(location.search).get("token");
  const $ = (id) => document.getElementById(id);
  const panels = new Map(); // stream name -> {el, head, rows, details, key, plots: [{plot, meter}]}
  let ws = null;
  let inflight = false;
  let paused = false;
  let seconds = 10;
  let maxSeconds = 10;
  let greeted = false;
  let frameTimes = [];

  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function fmt(v, digits = 3) {
    if (v === null || v === undefined) return "–";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
    return v.toFixed(a >= 100 ? 1 : digits);
  }

  // ------------------------------------------------------------------ connection

  function connect() {
    const proto = location.protocol === "https:" ? "wss:" : "ws:";
    ws = new WebSocket(`${proto}//${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : ""));
    ws.binaryType = "arraybuffer";
    ws.onmessage = (ev) => (typeof ev.data === "string" ? onJson(JSON.parse(ev.data)) : onFrame(ev.data));
    ws.onclose = () => {
      inflight = false;
      $("broker").textContent = "lost the view server; reconnecting…";
      $("broker").className = "error";
      setTimeout(connect, 1000);
    };
  }

  function send(msg) {
    if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(msg));
  }

  function sendSelect() {
    send({ type: "select", streams: view.selected });
  }

  function onJson(msg) {
    if (msg.type === "hello") {
      view.hello = msg;
      maxSeconds = msg.seconds;
      if (!greeted) {
        greeted = true;
        seconds = maxSeconds;
        $("seconds").value = String(seconds);
        $("seconds").max = String(maxSeconds);
        view.auto = msg.auto;
        for (const [name, chans] of Object.entries(msg.preselect)) view.selected[name] = chans;
      }
      inflight = false;
      sendSelect();
      requestAnimationFrame(tick);
    } else if (msg.type === "status") {
      onStatus(msg);
    }
  }

  function tick() {
    if (!ws || ws.readyState !== WebSocket.OPEN || inflight) return;
    if (paused || Object.keys(view.selected).length === 0) {
      setTimeout(() => requestAnimationFrame(tick), 200);
      return;
    }
    inflight = true;
    send({ type: "frame", width: plotWidth(), seconds });
  }

  function plotWidth() {
    for (const p of panels.values()) {
      if (p.plots.length) return Math.max(16, Math.round(p.plots[0].plot.bbox.width || 0)) || 1000;
    }
    const main = $("panels");
    return Math.max(16, Math.round((main.clientWidth - 280) * (window.devicePixelRatio || 1)));
  }

  // ------------------------------------------------------------------ frames

  function onFrame(buf) {
    const hlen = new DataView(buf).getUint32(0, true);
    const head = JSON.parse(new TextDecoder().decode(new Uint8Array(buf, 4, hlen)));
    const payload = new Float32Array(buf, 4 + hlen);
    for (const s of head.streams) {
      const n = s.columns;
      let o = s.offset;
      const x = payload.subarray(o, o + n);
      o += n;
      const channels = s.names.map((name, i) => {
        const min = payload.subarray(o, o + n);
        const max = payload.subarray(o + n, o + 2 * n);
        o += 2 * n;
        return { name, index: s.channels[i], min, max, level: s.levels[i] };
      });
      const frame = { ...s, x, channels, seq: head.seq, received: performance.now() };
      if (view.selected[s.name] !== undefined) {
        view.last[s.name] = frame;
        if (s.markers) drawMarkers(frame);
        else draw(frame);
      }
    }
    for (const name of head.pending) {
      const p = panels.get(name);
      const st = view.status && view.status.streams.find((s) => s.name === name);
      if (p && !p.plots.length && st && !st.view_error) p.note.textContent = "waiting for data…";
    }
    for (const [name, error] of Object.entries(head.failed || {})) {
      const p = panels.get(name);
      if (p) {
        p.note.textContent = `cannot draw it: ${error}`;
        p.note.style.display = "";
      }
    }
    view.frames += 1;
    const now = performance.now();
    frameTimes.push(now);
    while (frameTimes.length && frameTimes[0] < now - 1000) frameTimes.shift();
    $("fps").textContent = `${frameTimes.length} frames/s`;
    inflight = false;
    requestAnimationFrame(tick);
  }

  function panelFor(name) {
    let p = panels.get(name);
    if (p) return p;
    $("empty").style.display = "none";
    const e = el("section", "panel");
    e.dataset.name = name;
    const head = el("div", "phead");
    head.append(el("span", "name", name));
    const note = el("div", "note", "opening…");
    const rows = el("div", "rows");
    const details = el("details");
    details.append(el("summary", null, "statistics and subscribers"));
    const body = el("div");
    details.append(body);
    e.append(head, note, rows, details);
    $("panels").append(e);
    p = { el: e, head, note, rows, details: body, key: null, plots: [] };
    panels.set(name, p);
    const st = view.status && view.status.streams.find((s) => s.name === name);
    if (st) renderPanelStatus(p, st);
    return p;
  }

  function removePanel(name) {
    markers.delete(name);
    const p = panels.get(name);
    if (!p) return;
    for (const q of p.plots) q.plot.destroy();
    p.el.remove();
    panels.delete(name);
    delete view.last[name];
    if (!panels.size) $("empty").style.display = "";
  }

  function buildRows(p, frame) {
    for (const q of p.plots) q.plot.destroy();
    p.rows.textContent = "";
    p.plots = [];
    const st = view.status && view.status.streams.find((s) => s.name === frame.name);
    const units = (st && st.channel_units) || [];
    const n = frame.channels.length;
    const height = n <= 2 ? 150 : n <= 4 ? 110 : 70;
    const width = Math.max(200, p.rows.clientWidth - 250);
    frame.channels.forEach((ch, i) => {
      const color = COLORS[ch.index % COLORS.length];
      const row = el("div", "row");
      row.dataset.channel = ch.name;
      const label = el("div", "label", ch.name);
      label.title = ch.name;
      if (units[ch.index]) label.append(el("small", null, units[ch.index]));
      const plotEl = el("div", "plot");
      const meter = el("div", "meter");
      const bar = el("div", "bar");
      const fill = el("div");
      bar.append(fill);
      const db = el("div", "db");
      const text = el("div");
      meter.append(bar, db, text);
      row.append(label, plotEl, meter);
      p.rows.append(row);
      const plot = new uPlot(
        {
          width,
          height,
          legend: { show: false },
          cursor: { show: false },
          pxAlign: 0,
          scales: { x: { time: false, auto: false, range: () => [-seconds, 0] } },
          axes: [
            { size: i === n - 1 ? 30 : 8, values: i === n - 1 ? (u, v) => v.map((s) => s + " s") : () => [] },
            { size: 56, space: 22 },
          ],
          series: [
            {},
            { stroke: color, width: 1, points: { show: false } },
            { stroke: color, width: 1, points: { show: false } },
          ],
          bands: [{ series: [2, 1], fill: color + "66" }],
          hooks: { draw: [(u) => drawMarkerLines(u, p, i === 0)] },
        },
        [[], [], []],
        plotEl,
      );
      p.plots.push({ plot, fill, db, text });
    });
    p.key = frame.channels.map((c) => c.name).join("\u0000");
  }

  // A marker stream: its markers of the span shown, newest first, in its panel.
  function drawMarkers(frame) {
    const p = panelFor(frame.name);
    markers.set(frame.name, frame.markers);
    p.note.textContent = frame.live ? "" : "ended: the last markers received";
    p.note.style.display = frame.live ? "none" : "";
    const key = JSON.stringify(frame.markers);
    if (p.key === key) return;
    p.key = key;
    p.rows.textContent = "";
    const list = el("ol", "markers");
    for (const [t, text] of [...frame.markers].reverse()) {
      const li = el("li");
      li.append(el("time", null, new Date(t * 1000).toLocaleTimeString([], { hour12: false }) +
        "." + String(Math.floor((t % 1) * 1000)).padStart(3, "0")), el("span", null, text));
      list.append(li);
    }
    if (!frame.markers.length) list.append(el("li", "none", `no marker in the last ${fmt(seconds, 1)} s`));
    p.rows.append(list);
  }

  // Every marker stream's markers as dashed vertical lines over a plot (labelled on the panel's first row), at
  // x = marker time - the newest sample's time of the plotted stream.
  function drawMarkerLines(u, p, labelled) {
    let drawn = 0;
    const ctx = u.ctx;
    ctx.save();
    ctx.strokeStyle = "#e07b10";
    ctx.fillStyle = "#b05a00";
    ctx.setLineDash([4, 3]);
    ctx.font = `${Math.round(10 * (window.devicePixelRatio || 1))}px system-ui, sans-serif`;
    for (const list of markers.values()) {
      for (const [t, text] of list) {
        const x = t - p.tNewest;
        if (!(x >= -seconds && x <= 0)) continue;
        const px = u.valToPos(x, "x", true);
        ctx.beginPath();
        ctx.moveTo(px, u.bbox.top);
        ctx.lineTo(px, u.bbox.top + u.bbox.height);
        ctx.stroke();
        if (labelled) ctx.fillText(text, px + 3, u.bbox.top + 11);
        drawn += 1;
      }
    }
    ctx.restore();
    if (labelled) view.lines[p.el.dataset.name] = drawn;
  }

  function draw(frame) {
    const p = panelFor(frame.name);
    p.tNewest = frame.t_newest;
    const key = frame.channels.map((c) => c.name).join("\u0000");
    if (p.key !== key) buildRows(p, frame);
    p.note.textContent = frame.live ? "" : "ended: the last data received";
    p.note.style.display = frame.live ? "none" : "";
    const audio = !!(view.status && (view.status.streams.find((s) => s.name === frame.name) || {}).audio);
    frame.channels.forEach((ch, i) => {
      const q = p.plots[i];
      q.plot.setData([frame.x, ch.min, ch.max]);
      const lv = ch.level;
      if (audio) {
        const db = lv.dbfs === null ? -Infinity : lv.dbfs;
        q.fill.style.width = `${Math.max(0, Math.min(100, ((db + 60) / 60) * 100))}%`;
        q.db.textContent = lv.dbfs === null ? "−∞ dBFS" : `${lv.dbfs.toFixed(1)} dBFS`;
      } else {
        q.fill.style.width = "0%";
        q.db.textContent = "";
      }
      q.text.textContent = `RMS ${fmt(lv.rms)} · peak ${fmt(lv.peak)}`;
      q.text.dataset.rms = String(lv.rms);
    });
  }

  // ------------------------------------------------------------------ status

  function onStatus(msg) {
    view.status = msg;
    const b = $("broker");
    if (msg.broker) {
      b.textContent = `broker ${msg.broker.pid} v${msg.broker.version} at ${msg.broker.address} · up ${Math.round(msg.broker.uptime)} s`;
      b.className = "";
    } else {
      b.textContent = msg.error || "no broker";
      b.className = "error";
    }
    let changed = false;
    if (view.auto) {
      for (const s of msg.streams) {
        if (!s.ended && view.selected[s.name] === undefined) {
          view.selected[s.name] = null;
          changed = true;
        }
      }
      // A stream the list forgot (ended long ago) goes too: a page left open on a broker whose stream
      // names change would otherwise keep a window and a panel for each name it ever saw.
      for (const name of Object.keys(view.selected)) {
        if (!msg.streams.some((s) => s.name === name)) {
          delete view.selected[name];
          delete view.last[name];
          removePanel(name);
          changed = true;
        }
      }
    }
    if (changed) sendSelect();
    renderList(msg.streams);
    for (const s of msg.streams) {
      const p = panels.get(s.name);
      if (p) renderPanelStatus(p, s);
    }
    for (const name of Object.keys(view.selected)) {
      const p = panelFor(name);
      if (!p.plots.length && !msg.streams.some((s) => s.name === name)) {
        p.note.textContent = `waiting for stream ${name} to appear at the broker…`;
      }
    }
  }

  let listKey = null;

  function renderList(streams) {
    // Rebuilt only when something in it changed: a checkbox replaced under the pointer would lose a click.
    const key = JSON.stringify([
      streams.map((s) => [s.name, s.ended, s.gone, s.dtype, s.channels, s.rate, s.channel_names]),
      view.selected,
    ]);
    if (key === listKey) return;
    listKey = key;
    const ul = $("streams");
    ul.textContent = "";
    if (!streams.length) ul.append(el("li", "none", "no streams"));
    for (const s of streams) {
      const li = el("li");
      li.dataset.name = s.name;
      li.dataset.state = s.ended ? "ended" : "live";
      const label = el("label");
      const box = el("input");
      box.type = "checkbox";
      box.checked = view.selected[s.name] !== undefined;
      box.onchange = () => {
        view.auto = false;
        if (box.checked) view.selected[s.name] = null;
        else {
          delete view.selected[s.name];
          removePanel(s.name);
        }
        sendSelect();
        renderList(view.status.streams);
      };
      label.append(box, " " + s.name);
      li.append(label, el("span", `state ${s.ended ? "ended" : "live"}`, s.gone ? "ended" : s.ended ? "ending" : "live"));
      const rate = s.rate ? `${s.rate} Hz` : "no rate";
      li.append(el("div", "meta", `${s.dtype} × ${s.channels} · ${rate}`));
      const sel = view.selected[s.name];
      if (sel !== undefined && s.channel_names && s.channel_names.length > 1) {
        const chans = el("div", "channels");
        for (const c of s.channel_names) {
          const cl = el("label");
          const cb = el("input");
          cb.type = "checkbox";
          cb.checked = sel === null || sel.includes(c);
          cb.onchange = () => {
            view.auto = false;
            const boxes = [...chans.querySelectorAll("input")];
            const on = s.channel_names.filter((_, k) => boxes[k].checked);
            view.selected[s.name] = on.length === s.channel_names.length ? null : on;
            sendSelect();
          };
          cl.append(cb, " " + c);
          chans.append(cl);
        }
        li.append(chans);
      }
      ul.append(li);
    }
  }

  function stalled(s) {
    const src = s.source;
    if (!src || s.ended || !s.rate || src.last_sample_age == null) return false;
    const spacing = s.frames ? s.samples / s.frames / s.rate : 0;
    return src.last_sample_age > Math.max(1, 2 * spacing);
  }

  function renderPanelStatus(p, s) {
    p.el.classList.toggle("ended", !!s.ended);
    const st = s.statistics || {};
    const ours = s.subscribers.filter((u) => u.ours);
    const viewDrops = ours.reduce((a, u) => a + u.dropped, 0);
    const allDrops = s.subscribers.reduce((a, u) => a + u.dropped, 0);
    p.head.textContent = "";
    p.head.append(el("span", "name", s.name), el("span", `state ${s.ended ? "ended" : "live"}`, s.ended ? "ended" : "live"));
    const figs = [
      ["dtype", `${s.dtype} × ${s.channels}`],
      ["rate", s.rate ? `${s.rate} Hz` : "no rate"],
      // (the statistics' window is stream time: it stands still when nothing comes, so a stall says so instead)
      // (past twice its frames' spacing, and a second: a slow source's frames are far apart; none for markers)
      ["observed", stalled(s) ? `none for ${s.source.last_sample_age.toFixed(1)} s`
        : st.observed_rate ? `${Math.round(st.observed_rate)}/s` : "–"],
      ["samples", String(s.samples)],
      ["frames", String(s.frames)],
      ["slabs free", `${s.slabs_free}/${s.slabs}`],
      ["view drops", String(viewDrops)],
      ["drops (all subscribers)", String(allDrops)],
    ];
    const pub = s.publisher;
    if (pub && pub.held_back_s != null && !s.ended) {
      figs.push(["held back", `${pub.held_back_s.toFixed(1)} s (no free slab) by ${pub.held_back_by}`]);
    }
    if (s.source && !["running", "ended"].includes(s.source.state)) figs.push(["source", s.source.state]);
    for (const [k, v] of figs) {
      const f = el("span", "fig", `${k} ${v}`);
      f.dataset.key = k;
      if ((k === "view drops" || k.startsWith("drops")) && v !== "0") f.classList.add("bad");
      if (k === "held back" || k === "source" || (k === "observed" && v.startsWith("none"))) f.classList.add("bad");
      p.head.append(f);
    }
    if (s.view_error) {
      p.head.append(el("span", "fig bad", s.view_error));
      if (!p.plots.length) p.note.textContent = `cannot draw it: ${s.view_error}`;
    }
    const body = p.details;
    body.textContent = "";
    if (st.mean && st.mean.length) {
      const names = s.channel_names || [];
      const t = el("table");
      const hr = el("tr");
      for (const h of [`last ${st.window_seconds} s`, "mean", "std", "min", "max", "ptp"]) hr.append(el("th", null, h));
      t.append(hr);
      st.mean.forEach((_, i) => {
        const tr = el("tr");
        tr.append(el("td", null, names[i] || `ch_${i}`));
        for (const k of ["mean", "std", "min", "max", "ptp"]) tr.append(el("td", null, fmt(st[k][i], 4)));
        t.append(tr);
      });
      body.append(t);
    }
    const t = el("table");
    const hr = el("tr");
    for (const h of ["subscriber", "pid", "size", "policy", "delivered", "dropped", "leases", "lag"]) hr.append(el("th", null, h));
    t.append(hr);
    for (const u of s.subscribers) {
      const tr = el("tr", u.dropped > 0 ? "dropping" : null);
      const lag = u.lag_seconds !== null && u.lag_seconds !== undefined ? `${u.lag_seconds.toFixed(3)} s` : `${u.lag_samples}`;
      for (const v of [u.label + (u.ours ? " (this view)" : ""), u.pid, u.size, u.policy, u.delivered, u.dropped, u.leases, lag]) {
        tr.append(el("td", null, String(v)));
      }
      t.append(tr);
    }
    body.append(t);
  }

  // ------------------------------------------------------------------ controls

  $("seconds").onchange = () => {
    const v = parseFloat($("seconds").value);
    seconds = Number.isFinite(v) && v > 0 ? Math.min(v, maxSeconds) : maxSeconds;
    $("seconds").value = String(seconds);
  };
  $("pause").onclick = () => {
    paused = !paused;
    $("pause").textContent = paused ? "resume" : "pause";
  };
  window.addEventListener("resize", () => {
    for (const p of panels.values()) {
      const width = Math.max(200, p.rows.clientWidth - 250);
      for (const q of p.plots) q.plot.setSize({ width, height: q.plot.height });
    }
  });

  connect();
})();
