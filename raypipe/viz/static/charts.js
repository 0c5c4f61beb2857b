// Small SVG charts written for this dashboard: per-token lines/bars and histograms.
// No chart library: the page must work offline and under a strict Content-Security-Policy.

import { fmtShort, inlierRange, svg } from './common.js';

const MARGIN = { left: 64, right: 18, top: 30, bottom: 46 };

export function niceTicks(lo, hi, count = 6) {
  if (!(hi > lo)) { const d = Math.abs(lo) || 1; lo -= d / 2; hi += d / 2; }
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw) || raw;
  const ticks = [];
  for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
    ticks.push(Math.abs(v) < step * 1e-9 ? 0 : v);
  }
  // A narrow range can leave a single labelled tick: ask for finer steps until there are two.
  if (ticks.length < 2 && count < 48) return niceTicks(lo, hi, count * 2);
  return { ticks, step };
}

// The y range of all series, with zero in it; with `clip`, far outliers are left outside.
function extent(seriesList, clip) {
  const all = seriesList.flatMap((s) => s.values);
  const range = clip ? inlierRange(all) : inlierRange(all, Infinity);
  const lo = Math.min(range.lo, 0);
  const hi = Math.max(range.hi, 0);
  const pad = (hi - lo) * 0.06 || 0.5;
  return [lo - pad, hi + pad, range.clipped];
}

// A per-token chart over token indices 0..n-1.
// opts: series [{key,label,color,dash,width,values,bars}], n, promptEnd, yLabel, clip,
//       markers [{at, label}], height, onHover(i, clientX, clientY), attrs (data-* on the svg).
export function tokenChart(host, opts) {
  const width = Math.max(480, host.clientWidth || 900);
  const height = opts.height || 340;
  const m = MARGIN;
  const w = width - m.left - m.right;
  const h = height - m.top - m.bottom;
  const n = Math.max(1, opts.n);
  const x = (i) => m.left + ((i + 0.5) / n) * w;
  const [lo, hi, clipped] = extent(opts.series, opts.clip);
  const clamp = (v) => Math.max(lo, Math.min(hi, v));
  const y = (v) => m.top + (1 - (clamp(v) - lo) / (hi - lo)) * h;

  const root = svg('svg', {
    class: 'chart', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': opts.ariaLabel || 'per-token scores',
    ...(opts.attrs || {}),
  });

  // Prompt region in grey, so the eye goes to the response.
  if (opts.promptEnd > 0) {
    root.append(svg('rect', { class: 'prompt-region', x: m.left, y: m.top, width: Math.max(0, x(opts.promptEnd - 0.5) - m.left), height: h }));
    root.append(svg('text', { class: 'region-label', x: m.left + 6, y: m.top + 14, text: 'prompt' }));
  }

  const { ticks: yTicks } = niceTicks(lo, hi, Math.max(3, Math.round(h / 48)));
  for (const t of yTicks) {
    root.append(svg('line', { class: t === 0 ? 'zero-line' : 'grid', x1: m.left, x2: m.left + w, y1: y(t), y2: y(t) }));
    root.append(svg('text', { class: 'tick', x: m.left - 8, y: y(t) + 4, 'text-anchor': 'end', text: fmtShort(t) }));
  }
  const { ticks: xTicks } = niceTicks(0, n - 1, Math.max(2, Math.round(w / 80)));
  for (const t of xTicks) {
    if (t < 0 || t > n - 1 || !Number.isInteger(t)) continue;
    root.append(svg('line', { class: 'axis-tick', x1: x(t), x2: x(t), y1: m.top + h, y2: m.top + h + 5 }));
    root.append(svg('text', { class: 'tick', x: x(t), y: m.top + h + 18, 'text-anchor': 'middle', text: String(t) }));
  }
  root.append(svg('line', { class: 'axis', x1: m.left, x2: m.left + w, y1: m.top + h, y2: m.top + h }));
  root.append(svg('line', { class: 'axis', x1: m.left, x2: m.left, y1: m.top, y2: m.top + h }));
  root.append(svg('text', { class: 'axis-label', x: m.left + w / 2, y: height - 8, 'text-anchor': 'middle', text: opts.xLabel || 'token index (prompt → response)' }));
  root.append(svg('text', {
    class: 'axis-label', transform: `translate(14 ${m.top + h / 2}) rotate(-90)`, 'text-anchor': 'middle', text: opts.yLabel || '',
  }));

  let lastX = -Infinity;
  let row = 0;
  for (const mark of opts.markers || []) {
    const mx = x(mark.at - 0.5);
    // Labels of markers close together go on two rows instead of printing over each other.
    row = mx - lastX < 120 ? 1 - row : 0;
    lastX = mx;
    root.append(svg('line', { class: `marker ${mark.class || ''}`, x1: mx, x2: mx, y1: m.top - 6 - 12 * row, y2: m.top + h }));
    root.append(svg('text', { class: `marker-label ${mark.class || ''}`, x: mx + 5, y: m.top - 10 - 12 * row, text: mark.label }));
  }

  const band = w / n;
  for (const s of opts.series) {
    if (s.bars) {
      const g = svg('g', { class: 'bars', 'data-key': s.key });
      s.values.forEach((v, i) => {
        if (v === null || !Number.isFinite(v)) return;
        const top = Math.min(y(v), y(0));
        g.append(svg('rect', {
          x: x(i) - band * 0.4, width: Math.max(1, band * 0.8), y: top,
          height: Math.max(0.5, Math.abs(y(v) - y(0))), fill: v >= 0 ? s.color : s.negColor || s.color,
        }));
      });
      root.append(g);
      continue;
    }
    let d = '';
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || !Number.isFinite(v)) { pen = false; return; }
      d += `${pen ? 'L' : 'M'}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    root.append(svg('path', {
      class: 'series', d, stroke: s.color, 'stroke-width': s.width || 1.8,
      'stroke-dasharray': s.dash || null, 'data-key': s.key, fill: 'none',
      opacity: s.faded ? 0.45 : 1,
    }));
  }

  // Points outside a clipped axis sit on its edge, flagged with a triangle.
  if (clipped) {
    for (const s of opts.series) {
      s.values.forEach((v, i) => {
        if (v === null || !Number.isFinite(v) || (v >= lo && v <= hi)) return;
        const edge = v > hi ? m.top : m.top + h;
        const tip = v > hi ? edge - 5 : edge + 5;
        root.append(svg('path', {
          class: 'off-scale', d: `M${x(i) - 5},${edge} L${x(i) + 5},${edge} L${x(i)},${tip} Z`, fill: s.color,
        }));
      });
    }
    root.append(svg('text', {
      class: 'off-scale-note', x: m.left + w - 4, y: m.top + 14, 'text-anchor': 'end',
      text: `${clipped} outlier point${clipped > 1 ? 's' : ''} off scale (▲▼); hover for values`,
    }));
  }

  // Hover layer: a guide line and a dot per series at the nearest token.
  const guide = svg('line', { class: 'guide', y1: m.top, y2: m.top + h, visibility: 'hidden' });
  const dots = opts.series.filter((s) => !s.bars).map((s) => svg('circle', { r: 3.5, fill: s.color, class: 'dot', visibility: 'hidden' }));
  root.append(guide, ...dots);
  const overlay = svg('rect', { class: 'overlay', x: m.left, y: m.top, width: w, height: h });
  root.append(overlay);

  function highlight(i) {
    if (i === null || i === undefined || i < 0 || i >= n) {
      guide.setAttribute('visibility', 'hidden');
      dots.forEach((dot) => dot.setAttribute('visibility', 'hidden'));
      return;
    }
    guide.setAttribute('x1', x(i)); guide.setAttribute('x2', x(i));
    guide.setAttribute('visibility', 'visible');
    opts.series.filter((s) => !s.bars).forEach((s, k) => {
      const v = s.values[i];
      if (v === null || v === undefined || !Number.isFinite(v)) { dots[k].setAttribute('visibility', 'hidden'); return; }
      dots[k].setAttribute('cx', x(i)); dots[k].setAttribute('cy', y(v));
      dots[k].setAttribute('visibility', 'visible');
    });
  }
  function indexAt(clientX) {
    const box = root.getBoundingClientRect();
    const px = (clientX - box.left) * (width / box.width);
    return Math.max(0, Math.min(n - 1, Math.floor(((px - m.left) / w) * n)));
  }
  overlay.addEventListener('mousemove', (ev) => {
    const i = indexAt(ev.clientX);
    highlight(i);
    if (opts.onHover) opts.onHover(i, ev.clientX, ev.clientY);
  });
  overlay.addEventListener('mouseleave', () => { highlight(null); if (opts.onHover) opts.onHover(null); });

  host.replaceChildren(root);
  return { svg: root, highlight, x: (i) => x(i), width, height };
}

// Histogram of counts over bin edges; onHover(k, clientX, clientY) for bar k or null.
export function histogram(host, opts) {
  const width = Math.max(260, host.clientWidth || 360);
  const height = opts.height || 190;
  const m = { left: 40, right: 12, top: 12, bottom: 40 };
  const w = width - m.left - m.right;
  const h = height - m.top - m.bottom;
  const { edges, counts } = opts;
  const lo = edges[0];
  const hi = edges[edges.length - 1] > lo ? edges[edges.length - 1] : lo + 1;
  const x = (v) => m.left + ((v - lo) / (hi - lo)) * w;
  const top = Math.max(1, ...counts);
  const y = (c) => m.top + (1 - c / top) * h;
  const root = svg('svg', { class: 'chart histogram', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img', 'aria-label': opts.ariaLabel || 'histogram' });
  const { ticks: yTicks } = niceTicks(0, top, 3);
  for (const t of yTicks) {
    if (!Number.isInteger(t)) continue;
    root.append(svg('line', { class: t === 0 ? 'axis' : 'grid', x1: m.left, x2: m.left + w, y1: y(t), y2: y(t) }));
    root.append(svg('text', { class: 'tick', x: m.left - 6, y: y(t) + 4, 'text-anchor': 'end', text: String(t) }));
  }
  counts.forEach((c, k) => {
    const x0 = x(edges[k]);
    const x1 = x(edges[k + 1] ?? hi);
    const bar = svg('rect', {
      class: 'hist-bar', x: x0 + 0.5, width: Math.max(1, x1 - x0 - 1), y: y(c), height: Math.max(0, y(0) - y(c)),
      fill: opts.color, 'data-bin': k,
    });
    // A full-height hit area so that empty and short bins can be hovered too.
    const hit = svg('rect', { class: 'hist-hit', x: x0, width: Math.max(1, x1 - x0), y: m.top, height: h, 'data-bin': k });
    hit.addEventListener('mousemove', (ev) => { bar.classList.add('hover'); opts.onHover(k, ev.clientX, ev.clientY); });
    hit.addEventListener('mouseleave', () => { bar.classList.remove('hover'); opts.onHover(null); });
    root.append(bar, hit);
  });
  const { ticks: xTicks } = niceTicks(lo, hi, Math.max(2, Math.round(w / 70)));
  for (const t of xTicks) {
    if (t < lo - 1e-12 || t > hi + 1e-12) continue;
    root.append(svg('line', { class: 'axis-tick', x1: x(t), x2: x(t), y1: m.top + h, y2: m.top + h + 4 }));
    root.append(svg('text', { class: 'tick', x: x(t), y: m.top + h + 16, 'text-anchor': 'middle', text: fmtShort(t) }));
  }
  if (opts.mean !== null && opts.mean !== undefined) {
    root.append(svg('line', { class: 'mean-line', x1: x(opts.mean), x2: x(opts.mean), y1: m.top, y2: m.top + h }));
  }
  root.append(svg('text', { class: 'axis-label', x: m.left + w / 2, y: height - 6, 'text-anchor': 'middle', text: opts.xLabel || '' }));
  host.replaceChildren(root);
  return root;
}
