// Overview view: per trait, the spread of mean response scores over a prompt set, from Parquet.

import {
  MODE_LABELS, PALETTE, api, checkbox, clearError, el, field, fillSelect, fmt, hideTooltip,
  segmented, setChildren, showError, showTooltip,
} from './common.js';
import { histogram } from './charts.js';

export class OverviewView {
  constructor(root, app) {
    this.app = app;
    this.ticket = 0;
    this.state = { mode: 'raw', centered: false, layers: {} };
    const on = (from) => () => this.change(from);
    this.sel = {
      experiment: el('select', { id: 'ov-experiment', onchange: on('experiment') }),
      variant: el('select', { id: 'ov-variant', onchange: on('variant') }),
      prompt_set: el('select', { id: 'ov-prompt-set', onchange: on('prompt_set') }),
    };
    this.modes = segmented('mode', [['raw', 'raw'], ['normalized', 'normalized'], ['cosine', 'cosine']], (mode) => {
      this.state.mode = mode; this.change('scores');
    });
    this.centered = checkbox('centered (− baseline)', (v) => { this.state.centered = v; this.change('scores'); }, { id: 'ov-centered' });
    this.summary = el('div', { class: 'meta', id: 'ov-summary' });
    this.notes = el('div', { class: 'notes', id: 'ov-notes' });
    this.grid = el('div', { class: 'cards', id: 'ov-cards' });
    root.append(
      el('div', { class: 'card controls' },
        el('div', { class: 'row' },
          field('Experiment', this.sel.experiment),
          field('Variant', this.sel.variant),
          field('Prompt set', this.sel.prompt_set)),
        el('div', { class: 'row' }, field('Score', this.modes), this.centered)),
      this.summary,
      this.notes,
      this.grid,
    );
    window.addEventListener('resize', () => { if (this.data) this.render(); });
  }

  params() {
    const s = this.state;
    const layers = Object.entries(s.layers).map(([t, l]) => `${t}@${l}`).join(',');
    return {
      experiment: s.experiment, variant: s.variant, prompt_set: s.prompt_set, mode: s.mode,
      centered: s.centered ? '1' : '0', layers: layers || undefined,
    };
  }

  async show(params) {
    const s = this.state;
    for (const key of ['experiment', 'variant', 'prompt_set']) s[key] = params.get(key) || this.app.shared[key] || null;
    if (['raw', 'normalized', 'cosine'].includes(params.get('mode'))) s.mode = params.get('mode');
    if (params.has('centered')) s.centered = params.get('centered') === '1';
    for (const item of (params.get('layers') || '').split(',').filter(Boolean)) {
      const at = item.lastIndexOf('@');
      if (at > 0) s.layers[item.slice(0, at)] = item.slice(at + 1);
    }
    await this.change('experiment', true);
  }

  async change(from, initial = false) {
    const s = this.state;
    const ticket = ++this.ticket;
    const order = ['experiment', 'variant', 'prompt_set', 'scores'];
    const start = order.indexOf(from);
    if (!initial && this.sel[from]) s[from] = this.sel[from].value;
    clearError();
    try {
      if (start <= 0) {
        const list = await this.app.experiments();
        s.experiment = fillSelect(this.sel.experiment, list.map((e) => e.name), s.experiment);
      }
      if (start <= 1) {
        const info = await api('variants', { experiment: s.experiment });
        if (ticket !== this.ticket) return;
        this.configWarning = info.config_warning || null;
        const names = info.variants.map((v) => v.name);
        s.variant = fillSelect(this.sel.variant, names, names.includes(s.variant) ? s.variant : info.defaults.application);
      }
      if (start <= 2) {
        const sets = (await api('prompt_sets', { experiment: s.experiment, variant: s.variant })).prompt_sets;
        if (ticket !== this.ticket) return;
        const usable = sets.filter((p) => p.has_parquet);
        s.prompt_set = fillSelect(this.sel.prompt_set, usable.map((p) => p.name), s.prompt_set);
        if (!usable.length) throw new Error('no prompt set of this variant has a Parquet projections table');
      }
      Object.assign(this.app.shared, { experiment: s.experiment, variant: s.variant, prompt_set: s.prompt_set });
      const t0 = performance.now();
      const data = await api('overview', {
        experiment: s.experiment, variant: s.variant, prompt_set: s.prompt_set, mode: s.mode, centered: s.centered,
      });
      if (ticket !== this.ticket) return;
      this.data = data;
      this.elapsed = performance.now() - t0;
      this.render();
    } catch (err) {
      if (ticket !== this.ticket) return;
      showError(err.message);
      this.grid.replaceChildren();
    }
    this.app.writeHash('overview', this.params());
  }

  render() {
    const d = this.data;
    const s = this.state;
    this.modes.set(s.mode);
    this.centered.input.checked = s.centered;
    const byTrait = new Map();
    for (const g of d.groups) {
      if (!byTrait.has(g.trait)) byTrait.set(g.trait, []);
      byTrait.get(g.trait).push(g);
    }
    this.summary.replaceChildren(
      el('h2', { text: `${d.prompt_set} · ${d.variant}` }),
      el('span', { text: `${d.n_prompts.toLocaleString()} prompts · ${byTrait.size} traits · mean ${MODE_LABELS[s.mode]} over response tokens${s.centered ? ', centered' : ''} · answered in ${Math.round(this.elapsed)} ms` }),
    );
    const config = this.configWarning ? [this.configWarning] : [];
    setChildren(this.notes, [...(d.warnings || []), ...config].map((text) => el('p', { text })));
    const cards = [];
    [...byTrait.entries()].forEach(([trait, groups], ti) => {
      const keyOf = (g) => `${g.layer}:${g.method}:${g.component}`;
      const wanted = s.layers[trait];
      const group = groups.find((g) => keyOf(g) === wanted || String(g.layer) === wanted) || groups[0];
      const layerSel = el('select', { class: 'layer-select', 'aria-label': `layer for ${trait}`, onchange: (ev) => {
        s.layers[trait] = ev.target.value; this.render(); this.app.writeHash('overview', this.params());
      } });
      fillSelect(layerSel, groups.map((g) => ({ value: keyOf(g), label: `L${g.layer} ${g.method}${groups.some((o) => o.component !== g.component) ? ` ${g.component}` : ''}` })), keyOf(group));
      cards.push(this.card(trait, group, layerSel, PALETTE[ti % PALETTE.length]));
    });
    this.grid.replaceChildren(...cards);
    Object.assign(this.grid.dataset, { mode: s.mode, centered: s.centered ? '1' : '0' });
    for (const c of cards) c.draw();
  }

  card(trait, g, layerSel, color) {
    const s = this.state;
    const plot = el('div', { class: 'hist-host' });
    const stats = g.n
      ? `n ${g.n} · mean ${fmt(g.mean, 3)} · sd ${fmt(g.std, 3)} · range ${fmt(g.min, 3)} … ${fmt(g.max, 3)}`
      : 'no scores';
    const missing = g.n_missing ? el('span', { class: 'muted', text: ` · ${g.n_missing} without response tokens` }) : null;
    const top = el('ol', { class: 'top-list' }, g.top.map((t) => el('li', {},
      el('a', {
        href: '#', class: 'top-prompt', 'data-prompt-id': t.prompt_id, title: 'open in Trait Dynamics',
        onclick: (ev) => {
          ev.preventDefault();
          this.app.go('dynamics', {
            experiment: s.experiment, variant: s.variant, prompt_set: s.prompt_set, prompt_id: t.prompt_id,
            mode: s.mode, centered: s.centered ? '1' : '0', series: `${trait}@${g.layer}`,
          });
        },
      }, el('span', { class: 'pid', text: t.prompt_id }), el('span', { class: 'score', text: fmt(t.score, 4) }),
      el('span', { class: 'preview', text: t.preview || '' })))));
    const node = el('section', { class: 'card trait-card', 'data-trait': trait },
      el('header', {}, el('h3', { text: trait }), layerSel),
      el('p', { class: 'stats' }, stats, missing),
      plot,
      el('h4', { text: 'Top prompts' }),
      top);
    node.draw = () => {
      if (!g.histogram) { plot.replaceChildren(el('p', { class: 'empty', text: 'no data' })); return; }
      histogram(plot, {
        edges: g.histogram.edges, counts: g.histogram.counts, color, mean: g.mean,
        xLabel: `mean ${s.mode} score per prompt (dashed: mean)`, ariaLabel: `histogram of ${trait}`,
        onHover: (k, cx, cy) => {
          if (k === null) { hideTooltip(); return; }
          const lo = g.histogram.edges[k];
          const hi = g.histogram.edges[k + 1];
          const last = k === g.histogram.counts.length - 1;
          const count = g.histogram.counts[k];
          showTooltip(cx, cy, `${count} prompt${count === 1 ? '' : 's'}`, `${trait} · L${g.layer}`, [
            { label: 'mean score in', value: `[${fmt(lo, 4)}, ${fmt(hi, 4)}${last ? ']' : ')'}` },
          ]);
        },
      });
    };
    return node;
  }
}
