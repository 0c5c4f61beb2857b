// Model Analysis view: one trait's scores on the same tokens under two model variants.

import {
  MODE_LABELS, api, checkbox, clearError, el, field, fillSelect, fmt, hideTooltip, maxAbs, robustMaxAbs,
  segmented, setChildren, shadeLegend, showError, showTooltip, swatch, tokenLabel, tokenStrip,
} from './common.js';
import { tokenChart } from './charts.js';

const COLOR_A = '#4e79a7';
const COLOR_B = '#f28e2b';
const POS = '#d62728';
const NEG = '#1f77b4';
const COLUMNS = [
  ['prompt_id', 'Prompt'], ['n_tokens', 'Response tokens'], ['mean_a', 'Mean A'], ['mean_b', 'Mean B'],
  ['mean_diff', 'Mean Δ (B − A)'], ['max_diff', 'Max Δ'], ['max_at', 'Max Δ at'],
];

export class ModelsView {
  constructor(root, app) {
    this.app = app;
    this.ticket = 0;
    this.state = { mode: 'raw', centered: false, cleaned: false, clip: true, sort: { key: 'mean_diff', dir: -1 } };
    const on = (from) => () => this.change(from);
    this.sel = {
      experiment: el('select', { id: 'cmp-experiment', onchange: on('experiment') }),
      variant_a: el('select', { id: 'cmp-variant-a', onchange: on('variant_a') }),
      variant_b: el('select', { id: 'cmp-variant-b', onchange: on('variant_b') }),
      prompt_set: el('select', { id: 'cmp-prompt-set', onchange: on('prompt_set') }),
      trait: el('select', { id: 'cmp-trait', onchange: on('trait') }),
      layer: el('select', { id: 'cmp-layer', onchange: on('layer') }),
    };
    this.modes = segmented('mode', [['raw', 'raw'], ['normalized', 'normalized'], ['cosine', 'cosine']], (mode) => {
      this.state.mode = mode; this.change('scores');
    });
    this.centered = checkbox('centered (− baseline)', (v) => { this.state.centered = v; this.change('scores'); }, { id: 'cmp-centered' });
    this.cleaned = checkbox('clean massive dims', (v) => { this.state.cleaned = v; this.change('scores'); }, { id: 'cmp-cleaned' });
    this.clip = checkbox('clip outliers', (v) => {
      this.state.clip = v; if (this.detail) this.renderDetail(); this.app.writeHash('models', this.params());
    }, { id: 'cmp-clip', title: 'keep attention-sink spikes from flattening the y axis' });
    this.head = el('div', { class: 'meta', id: 'cmp-head' });
    this.chartHost = el('div', { class: 'chart-host', id: 'cmp-chart' });
    this.diffHost = el('div', { class: 'chart-host', id: 'cmp-diff' });
    this.legend = el('div', { class: 'legend' });
    this.textHost = el('div', { id: 'cmp-text' });
    this.tableHost = el('div', { class: 'table-wrap', id: 'cmp-table' });
    this.tableNote = el('p', { class: 'hint' });
    this.fileNotes = el('div', { class: 'notes', id: 'cmp-notes' });

    root.append(
      el('div', { class: 'card controls' },
        el('div', { class: 'row' },
          field('Experiment', this.sel.experiment),
          field('Variant A', this.sel.variant_a),
          field('Variant B', this.sel.variant_b),
          field('Prompt set', this.sel.prompt_set),
          field('Trait', this.sel.trait),
          field('Layer', this.sel.layer)),
        el('div', { class: 'row' }, field('Score', this.modes), this.centered, this.cleaned, this.clip),
        this.fileNotes),
      el('div', { class: 'card' }, this.head, this.chartHost, this.legend, this.diffHost, this.textHost),
      el('div', { class: 'card' },
        el('h3', { text: 'Per-prompt summary (response tokens)' }), this.tableNote, this.tableHost),
    );
    window.addEventListener('resize', () => { if (this.detail) this.renderDetail(); });
  }

  params() {
    const s = this.state;
    return {
      experiment: s.experiment, variant_a: s.variant_a, variant_b: s.variant_b, prompt_set: s.prompt_set,
      trait: s.trait, layer: s.layer, prompt_id: s.prompt_id, mode: s.mode,
      centered: s.centered ? '1' : '0', cleaned: s.cleaned ? '1' : '0',
      sort: `${s.sort.key}:${s.sort.dir > 0 ? 'asc' : 'desc'}`,
      clip: s.clip ? undefined : '0',
    };
  }

  async show(params) {
    const s = this.state;
    s.experiment = params.get('experiment') || this.app.shared.experiment || null;
    s.prompt_set = params.get('prompt_set') || this.app.shared.prompt_set || null;
    for (const key of ['variant_a', 'variant_b', 'trait', 'layer', 'prompt_id']) s[key] = params.get(key) || s[key] || null;
    if (['raw', 'normalized', 'cosine'].includes(params.get('mode'))) s.mode = params.get('mode');
    if (params.has('centered')) s.centered = params.get('centered') === '1';
    if (params.has('cleaned')) s.cleaned = params.get('cleaned') === '1';
    if (params.has('clip')) s.clip = params.get('clip') !== '0';
    const sort = (params.get('sort') || '').split(':');
    if (COLUMNS.some(([k]) => k === sort[0])) s.sort = { key: sort[0], dir: sort[1] === 'asc' ? 1 : -1 };
    await this.change('experiment', true);
  }

  async change(from, initial = false) {
    const s = this.state;
    const ticket = ++this.ticket;
    const order = ['experiment', 'variant_a', 'variant_b', 'prompt_set', 'trait', 'layer', 'scores', 'prompt'];
    const start = order.indexOf(from);
    if (!initial && this.sel[from]) s[from] = this.sel[from].value;
    if (from === 'layer') s.layer = this.sel.layer.value;
    clearError();
    const stale = () => ticket !== this.ticket;
    try {
      if (start <= 0) {
        const list = await this.app.experiments();
        s.experiment = fillSelect(this.sel.experiment, list.map((e) => e.name), s.experiment);
      }
      if (start <= 2) {
        const info = await api('variants', { experiment: s.experiment });
        if (stale()) return;
        this.variants = info.variants;
        this.configWarning = info.config_warning || null;
        const names = info.variants.map((v) => v.name);
        s.variant_a = fillSelect(this.sel.variant_a, names, names.includes(s.variant_a) ? s.variant_a : info.defaults.application);
        const other = names.find((n) => n !== s.variant_a) || s.variant_a;
        s.variant_b = fillSelect(this.sel.variant_b, names, names.includes(s.variant_b) && s.variant_b !== s.variant_a ? s.variant_b : other);
      }
      if (start <= 3) {
        const [a, b] = await Promise.all([s.variant_a, s.variant_b].map((v) => api('prompt_sets', { experiment: s.experiment, variant: v })));
        if (stale()) return;
        const inB = new Set(b.prompt_sets.filter((p) => p.n_prompts).map((p) => p.name));
        const both = a.prompt_sets.filter((p) => p.n_prompts && inB.has(p.name)).map((p) => p.name);
        s.prompt_set = fillSelect(this.sel.prompt_set, both, s.prompt_set);
        if (!both.length) throw new Error(`no prompt set has responses in both ${s.variant_a} and ${s.variant_b}`);
      }
      if (start <= 4) {
        const [a, b] = await Promise.all([s.variant_a, s.variant_b].map((v) => api('traits', { experiment: s.experiment, variant: v, prompt_set: s.prompt_set })));
        if (stale()) return;
        // A trait whose projection files cannot be read has nothing to compare; say why.
        this.traitProblems = [...a.traits, ...b.traits].filter((t) => t.error).map((t) => t.error);
        const inB = new Set(b.traits.filter((t) => !t.error).map((t) => t.trait));
        const both = a.traits.filter((t) => !t.error).map((t) => t.trait).filter((t) => inB.has(t));
        s.trait = fillSelect(this.sel.trait, both, s.trait);
        if (!both.length) throw new Error('no trait is projected in both variants for this prompt set');
      }
      Object.assign(this.app.shared, { experiment: s.experiment, prompt_set: s.prompt_set });
      const va = this.variants.find((v) => v.name === s.variant_a);
      const vb = this.variants.find((v) => v.name === s.variant_b);
      this.cleanable = Boolean(va && vb && va.has_calibration && vb.has_calibration);
      this.calibrationProblems = [va, vb].filter((v) => v && v.calibration_warning).map((v) => v.calibration_warning);
      if (!this.cleanable) s.cleaned = false;
      const query = {
        experiment: s.experiment, prompt_set: s.prompt_set, variant_a: s.variant_a, variant_b: s.variant_b,
        trait: s.trait, mode: s.mode, centered: s.centered, cleaned: s.cleaned,
      };
      if (start <= 6) {
        let summary;
        try {
          summary = await api('compare', { ...query, layer: s.layer });
        } catch (err) {
          // A layer kept from another trait may not exist here: fall back to the default one.
          if (err.status !== 404 || !s.layer) throw err;
          summary = await api('compare', query);
        }
        if (stale()) return;
        this.summary = summary;
        s.layer = String(summary.layer);
        fillSelect(this.sel.layer, summary.layers.map((l) => ({ value: String(l.layer), label: `L${l.layer} (${l.method})` })), s.layer);
        if (!summary.rows.some((r) => r.prompt_id === s.prompt_id)) s.prompt_id = this.sortedRows()[0]?.prompt_id || null;
      }
      this.renderControls();
      this.renderTable();
      if (!s.prompt_id) throw new Error('no prompt has projections in both variants');
      const detail = await api('compare_prompt', { ...query, layer: s.layer, prompt_id: s.prompt_id });
      if (stale()) return;
      this.detail = detail;
      this.renderDetail();
      this.renderTable();
    } catch (err) {
      if (stale()) return;
      showError(err.message);
    }
    this.app.writeHash('models', this.params());
  }

  renderControls() {
    const s = this.state;
    this.modes.set(s.mode);
    this.centered.input.checked = s.centered;
    this.cleaned.input.checked = s.cleaned;
    this.clip.input.checked = s.clip;
    this.cleaned.input.disabled = !this.cleanable;
    const broken = this.calibrationProblems || [];
    const why = broken.length ? 'a calibration file is unusable' : 'needs calibration in both';
    this.cleaned.querySelector('span').textContent = this.cleanable ? 'clean massive dims' : `clean massive dims (${why})`;
    this.cleaned.title = broken.join('\n');
    const config = this.configWarning ? [this.configWarning] : [];
    setChildren(this.fileNotes, [...broken, ...(this.traitProblems || []), ...config].map((text) => el('p', { text })));
  }

  sortedRows() {
    const { key, dir } = this.state.sort;
    const rows = [...(this.summary ? this.summary.rows : [])];
    const val = (r) => (key === 'prompt_id' ? r.prompt_id : r[key]);
    rows.sort((a, b) => {
      const x = val(a);
      const y = val(b);
      if (x === null || x === undefined) return 1;
      if (y === null || y === undefined) return -1;
      if (key === 'prompt_id') {
        const nx = Number(x);
        const ny = Number(y);
        if (Number.isFinite(nx) && Number.isFinite(ny)) return dir * (nx - ny);
        return dir * String(x).localeCompare(String(y));
      }
      return dir * (x - y);
    });
    return rows;
  }

  sortBy(key) {
    const sort = this.state.sort;
    this.state.sort = { key, dir: sort.key === key ? -sort.dir : (key === 'prompt_id' ? 1 : -1) };
    this.renderTable();
    this.app.writeHash('models', this.params());
  }

  renderTable() {
    const s = this.state;
    const sum = this.summary;
    if (!sum) { this.tableHost.replaceChildren(); return; }
    this.tableNote.textContent = `${sum.rows.length} prompts in both ${sum.variant_a} (A) and ${sum.variant_b} (B) · `
      + `${sum.trait} L${sum.layer} · ${s.mode}${s.centered ? ', centered' : ''}${s.cleaned ? ', cleaned' : ''}`
      + ` · Δ over response tokens shared by both · read from ${sum.source === 'parquet' ? 'Parquet' : 'JSON'}`
      + (sum.missing.length ? ` · ${sum.missing.length} prompts lack a projection` : '')
      + ' · click a header to sort, a row to plot it';
    const header = el('tr', {}, COLUMNS.map(([key, label]) => {
      const active = s.sort.key === key;
      return el('th', { 'aria-sort': active ? (s.sort.dir > 0 ? 'ascending' : 'descending') : 'none' },
        el('button', { type: 'button', class: 'sort', 'data-sort': key, onclick: () => this.sortBy(key) },
          label, active ? (s.sort.dir > 0 ? ' ▲' : ' ▼') : ''));
    }));
    const scale = maxAbs(sum.rows.map((r) => r.mean_diff));
    const body = this.sortedRows().map((r) => {
      const diffCell = el('td', { class: 'num diff', text: fmt(r.mean_diff, 4) });
      if (r.mean_diff !== null && scale) diffCell.style.setProperty('--bar', `${Math.round((Math.abs(r.mean_diff) / scale) * 100)}%`);
      diffCell.classList.add(r.mean_diff >= 0 ? 'pos' : 'neg');
      const tokensCell = el('td', { class: 'num' }, String(r.n_tokens),
        r.tokens_match ? null : el('span', { class: 'badge', title: 'the variants generated different responses', text: ` ${r.n_compared} shared` }));
      return el('tr', {
        class: r.prompt_id === s.prompt_id ? 'selected' : '', 'data-prompt-id': r.prompt_id,
        onclick: () => { s.prompt_id = r.prompt_id; this.change('prompt'); },
      },
      el('td', { text: r.prompt_id }),
      tokensCell,
      el('td', { class: 'num', text: fmt(r.mean_a, 4) }),
      el('td', { class: 'num', text: fmt(r.mean_b, 4) }),
      diffCell,
      el('td', { class: 'num', text: fmt(r.max_diff, 4) }),
      el('td', { class: 'at', text: r.max_at === null ? '—' : `#${r.max_at} ${tokenLabel(r.max_token)}` }));
    });
    this.tableHost.replaceChildren(el('table', { class: 'summary' }, el('thead', {}, header), el('tbody', {}, body)));
  }

  renderDetail() {
    const d = this.detail;
    const s = this.state;
    const n = Math.max(d.tokens.length, d.a.length, d.b.length);
    const yLabel = `${MODE_LABELS[s.mode]}${s.centered ? ', centered' : ''}${s.cleaned ? ', cleaned' : ''}`;
    const markers = [{ at: d.prompt_end, label: 'response starts', class: 'response-start' }];
    if (!d.tokens_match && d.common_prefix < d.tokens.length) {
      markers.push({ at: d.common_prefix, label: 'responses diverge', class: 'diverge' });
    }
    setChildren(this.head,
      el('h2', { text: `Prompt ${d.prompt_id}` }),
      el('span', { text: `${d.trait} · L${d.layer} (${d.method}) · A = ${d.variant_a}, B = ${d.variant_b}` }),
      d.tokens_match ? null : el('span', { class: 'badge warn', text: `different responses: Δ only on the first ${d.common_prefix} shared tokens` }),
    );
    const hover = (i, cx, cy) => this.hover(i, cx, cy);
    this.chart = tokenChart(this.chartHost, {
      n, promptEnd: d.prompt_end, yLabel, markers, height: 300, onHover: hover, clip: s.clip,
      series: [
        { key: 'a', color: COLOR_A, values: d.a },
        { key: 'b', color: COLOR_B, values: d.b },
      ],
      attrs: { 'data-mode': s.mode, 'data-prompt-id': d.prompt_id },
    });
    this.legend.replaceChildren(
      el('span', { class: 'legend-item' }, swatch(COLOR_A), `A: ${d.variant_a}`),
      el('span', { class: 'legend-item' }, swatch(COLOR_B), `B: ${d.variant_b}`),
      el('span', { class: 'legend-item' }, swatch(POS), 'Δ > 0 (B higher)'),
      el('span', { class: 'legend-item' }, swatch(NEG), 'Δ < 0 (A higher)'),
    );
    this.diffChart = tokenChart(this.diffHost, {
      n, promptEnd: d.prompt_end, yLabel: 'Δ = B − A', markers: markers.slice(1), height: 190, onHover: hover, clip: s.clip,
      series: [{ key: 'diff', color: POS, negColor: NEG, values: d.diff, bars: true }],
      ariaLabel: 'per-token difference', attrs: { 'data-mode': s.mode },
    });
    const scale = robustMaxAbs(d.diff.slice(d.prompt_end));
    setChildren(this.textHost,
      el('div', { class: 'text-head' }, el('h3', { text: `Response of A (${d.variant_a})` }), shadeLegend(scale, 'shaded by Δ = B − A')),
      el('div', { id: 'cmp-response' }, tokenStrip(d.tokens, d.prompt_end, d.tokens.length, d.diff, scale, (i, cx, cy) => {
        this.chart.highlight(i); this.diffChart.highlight(i); this.hover(i, cx, cy);
      })),
      d.tokens_match ? null : el('details', {}, el('summary', { text: `Response of B (${d.variant_b})` }), el('p', { class: 'plain', text: d.response_b || '' })),
    );
  }

  hover(i, cx, cy) {
    if (i === null) { hideTooltip(); this.chart?.highlight(null); this.diffChart?.highlight(null); return; }
    const d = this.detail;
    this.chart.highlight(i); this.diffChart.highlight(i);
    const token = d.tokens[i] ?? (d.tokens_b || [])[i] ?? '';
    const tokenB = d.tokens_b ? d.tokens_b[i] : token;
    const where = i < d.prompt_end ? `prompt token ${i}` : `response token ${i - d.prompt_end}`;
    const rows = [
      { color: COLOR_A, label: `A ${d.variant_a}`, value: fmt(d.a[i], 6) },
      { color: COLOR_B, label: `B ${d.variant_b}${tokenB !== token ? ` on ${tokenLabel(tokenB ?? '')}` : ''}`, value: fmt(d.b[i], 6) },
      { color: (d.diff[i] ?? 0) >= 0 ? POS : NEG, label: 'Δ B − A', value: fmt(d.diff[i], 6) },
    ];
    showTooltip(cx, cy, tokenLabel(token), `#${i} · ${where}`, rows);
  }
}
