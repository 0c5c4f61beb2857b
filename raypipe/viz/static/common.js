// Shared front-end helpers: DOM building, API calls, number formats, tooltip, colours.
// Token text comes from model output, so it only ever reaches the page via textContent.

export const SVG_NS = 'http://www.w3.org/2000/svg';

// Tableau 10: distinct on screen and in print, friendly to the common colour deficiencies.
export const PALETTE = ['#4e79a7', '#f28e2b', '#e15759', '#76b7b2', '#59a14f',
  '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac'];
export const DASHES = ['', '6 4', '2 3', '10 3 2 3'];
export const MODE_LABELS = {
  raw: 'raw score (h · v̂)',
  normalized: 'normalized (score / mean ‖h‖)',
  cosine: 'cosine (score / ‖h‖)',
};

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else if (key === 'dataset') Object.assign(node.dataset, value);
    else node.setAttribute(key, value === true ? '' : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === 'text') node.textContent = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children.flat()) if (child) node.append(child);
  return node;
}

// replaceChildren without the "null" text nodes that conditional children would leave.
export function setChildren(node, ...children) {
  node.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

export class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

export async function api(endpoint, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value === undefined || value === null || value === '') continue;
    query.set(key, typeof value === 'boolean' ? (value ? '1' : '0') : String(value));
  }
  const response = await fetch(`/api/${endpoint}?${query}`);
  let body;
  try { body = await response.json(); } catch { body = {}; }
  if (!response.ok) throw new ApiError(body.error || `HTTP ${response.status}`, response.status);
  return body;
}

// Enough digits to tell scores apart in a tooltip without pretending to float64 precision.
export function fmt(value, digits = 5) {
  if (value === null || value === undefined || Number.isNaN(value)) return '—';
  if (value === 0) return '0';
  const abs = Math.abs(value);
  if (abs >= 1e5 || abs < 1e-4) return value.toExponential(digits - 1);
  return Number(value.toPrecision(digits)).toString();
}

export function fmtShort(value) { return fmt(value, 3); }

// Tokenizer pieces can carry BPE markers for spaces and newlines; show them as text.
export function tokenDisplay(token) {
  return token.replace(/^Ġ/, ' ').replace(/^▁/, ' ').replace(/Ċ/g, '\n');
}

export function tokenLabel(token) {
  const text = tokenDisplay(token).replace(/\n/g, '⏎').replace(/\t/g, '⇥');
  return `“${text}”`;
}

export function isSpecial(token) { return /^<[|｜].*[|｜]>$|^<\/?s>$/.test(token); }

// Diverging shade around zero: red for positive scores, blue for negative.
export function shade(value, maxAbs) {
  if (value === null || value === undefined || !maxAbs) return 'transparent';
  const a = Math.min(1, Math.abs(value) / maxAbs) * 0.72;
  return value >= 0 ? `rgba(214, 39, 40, ${a.toFixed(3)})` : `rgba(31, 119, 180, ${a.toFixed(3)})`;
}

export function maxAbs(values) {
  let m = 0;
  for (const v of values) if (v !== null && Number.isFinite(v)) m = Math.max(m, Math.abs(v));
  return m;
}

// Range of the values without far outliers (beyond 10 IQRs of the quartiles), and how many
// were left out. Attention-sink tokens score hundreds of times the rest and would flatten
// every other token if the axis had to fit them.
export function inlierRange(values, k = 10) {
  const v = values.filter((x) => x !== null && Number.isFinite(x)).sort((a, b) => a - b);
  if (!v.length) return { lo: -1, hi: 1, clipped: 0 };
  if (v.length < 8) return { lo: v[0], hi: v[v.length - 1], clipped: 0 };
  const q = (p) => v[Math.floor(p * (v.length - 1))];
  const q1 = q(0.25);
  const q3 = q(0.75);
  const iqr = q3 - q1 || Math.max(Math.abs(q1), Math.abs(q3), 1e-12) * 0.1;
  const inside = v.filter((x) => x >= q1 - k * iqr && x <= q3 + k * iqr);
  return { lo: inside[0], hi: inside[inside.length - 1], clipped: v.length - inside.length };
}

export function robustMaxAbs(values) {
  const { lo, hi } = inlierRange(values);
  return Math.max(Math.abs(lo), Math.abs(hi));
}

// -- tooltip -------------------------------------------------------------------------------

let tooltipNode = null;

export function showTooltip(x, y, title, subtitle, rows) {
  if (!tooltipNode) tooltipNode = document.getElementById('tooltip');
  setChildren(tooltipNode,
    el('div', { class: 'tt-title', text: title }),
    subtitle ? el('div', { class: 'tt-sub', text: subtitle }) : null,
    rows.length ? el('table', { class: 'tt-rows' }, rows.map((row) => el('tr', {},
      el('td', {}, row.color ? swatch(row.color, row.dash) : null),
      el('td', { class: 'tt-label', text: row.label }),
      el('td', { class: 'tt-value', text: row.value })))) : null,
  );
  tooltipNode.hidden = false;
  const pad = 14;
  const { innerWidth: w, innerHeight: h } = window;
  const rect = tooltipNode.getBoundingClientRect();
  let left = x + pad;
  let top = y + pad;
  if (left + rect.width > w - 4) left = Math.max(4, x - rect.width - pad);
  if (top + rect.height > h - 4) top = Math.max(4, y - rect.height - pad);
  tooltipNode.style.left = `${left}px`;
  tooltipNode.style.top = `${top}px`;
}

export function hideTooltip() {
  if (!tooltipNode) tooltipNode = document.getElementById('tooltip');
  tooltipNode.hidden = true;
}

export function swatch(color, dash = '') {
  return svg('svg', { class: 'swatch', width: 22, height: 10, 'aria-hidden': 'true' },
    svg('line', { x1: 1, y1: 5, x2: 21, y2: 5, stroke: color, 'stroke-width': 3,
      'stroke-dasharray': dash || null }));
}

// -- form controls -------------------------------------------------------------------------

export function field(label, control) {
  return el('label', { class: 'field' }, el('span', { class: 'field-label', text: label }), control);
}

export function fillSelect(select, options, value) {
  select.replaceChildren(...options.map((o) => {
    const opt = typeof o === 'string' ? { value: o, label: o } : o;
    return el('option', { value: opt.value, text: opt.label, disabled: opt.disabled });
  }));
  const values = options.map((o) => (typeof o === 'string' ? o : o.value));
  select.value = values.includes(value) ? value : (values[0] ?? '');
  return select.value;
}

export function segmented(name, options, onChange) {
  const group = el('div', { class: 'segmented', role: 'group', 'aria-label': name });
  const buttons = options.map(([value, label]) => el('button', {
    type: 'button', dataset: { [name]: value }, text: label,
    onclick: () => { set(value); onChange(value); },
  }));
  group.append(...buttons);
  function set(value) {
    for (const b of buttons) b.setAttribute('aria-pressed', String(b.dataset[name] === value));
  }
  group.set = set;
  return group;
}

export function checkbox(label, onChange, attrs = {}) {
  const input = el('input', { type: 'checkbox', ...attrs });
  input.addEventListener('change', () => onChange(input.checked));
  const wrap = el('label', { class: 'check' }, input, el('span', { text: label }));
  wrap.input = input;
  return wrap;
}

export function showError(message) {
  const node = document.getElementById('error');
  node.replaceChildren(el('strong', { text: 'Error: ' }), message);
  node.hidden = false;
}

export function clearError() { document.getElementById('error').hidden = true; }

// -- token strip ---------------------------------------------------------------------------

// Tokens [start, end) as shaded spans; `index` maps a span back to its chart position.
export function tokenStrip(tokens, start, end, values, scale, onHover) {
  const box = el('div', { class: 'tokens' });
  for (let i = start; i < end; i += 1) {
    const token = tokens[i];
    const display = tokenDisplay(token);
    const special = isSpecial(token);
    const span = el('span', {
      class: special ? 'tok special' : 'tok',
      dataset: { i: String(i) },
      text: display.includes('\n') ? display.replace(/\n/g, '↵') : display,
    });
    span.style.backgroundColor = shade(values ? values[i] : null, scale);
    span.addEventListener('mouseenter', (ev) => onHover(i, ev.clientX, ev.clientY, span));
    span.addEventListener('mousemove', (ev) => onHover(i, ev.clientX, ev.clientY, span));
    span.addEventListener('mouseleave', () => onHover(null));
    box.append(span);
    if (display.includes('\n')) box.append(el('br'));
  }
  return box;
}

export function shadeLegend(scale, label) {
  const bar = el('span', { class: 'shade-bar' });
  return el('div', { class: 'shade-legend' },
    el('span', { text: label }),
    el('span', { class: 'shade-num', text: fmtShort(-scale) }),
    bar,
    el('span', { class: 'shade-num', text: `+${fmtShort(scale)}` }));
}
