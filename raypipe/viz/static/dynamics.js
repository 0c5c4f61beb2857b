// Trait Dynamics view: per-token trait scores of one prompt, overlaid by trait and layer.

import {
  DASHES, MODE_LABELS, PALETTE, api, checkbox, clearError, el, field, fillSelect, fmt,
  hideTooltip, robustMaxAbs, segmented, shadeLegend, showError, showTooltip, swatch, tokenLabel,
  tokenStrip,
} from './common.js';
import { tokenChart } from './charts.js';

export class DynamicsView {
  constructor(root, app) {
    this.app = app;
    this.ticket = 0;
    this.state = { mode: 'raw', centered: false, cleaned: false, showPrompt: true, clip: true, series: null, focus: null };
    this.data = null;

    this.sel = {
      experiment: el('select', { id: 'dyn-experiment', onchange: () => this.change('experiment') }),
      variant: el('select', { id: 'dyn-variant', onchange: () => this.change('variant') }),
      prompt_set: el('select', { id: 'dyn-prompt-set', onchange: () => this.change('prompt_set') }),
      prompt_id: el('select', { id: 'dyn-prompt', class: 'wide', onchange: () => this.change('prompt_id') }),
    };
    this.prevBtn = el('button', { type: 'button', class: 'step', title: 'previous prompt', text: '‹', onclick: () => this.step(-1) });
    this.nextBtn = el('button', { type: 'button', class: 'step', title: 'next prompt', text: '›', onclick: () => this.step(1) });
    this.modes = segmented('mode', [['raw', 'raw'], ['normalized', 'normalized'], ['cosine', 'cosine']], (mode) => {
      this.state.mode = mode; this.change('scores');
    });
    this.centered = checkbox('centered (− baseline)', (on) => { this.state.centered = on; this.change('scores'); }, { id: 'dyn-centered' });
    this.cleaned = checkbox('clean massive dims', (on) => { this.state.cleaned = on; this.change('scores'); }, { id: 'dyn-cleaned' });
    this.showPrompt = checkbox('show prompt tokens', (on) => { this.state.showPrompt = on; this.redraw(); }, { id: 'dyn-show-prompt' });
    this.clip = checkbox('clip outliers', (on) => { this.state.clip = on; this.redraw(); }, { id: 'dyn-clip', title: 'keep attention-sink spikes from flattening the y axis' });
    this.traitBox = el('div', { class: 'trait-list', id: 'dyn-traits' });
    this.chartHost = el('div', { class: 'chart-host', id: 'dyn-chart' });
    this.legend = el('div', { class: 'legend', id: 'dyn-legend' });
    this.notes = el('div', { class: 'notes' });
    this.textHost = el('div', { id: 'dyn-text' });
    this.meta = el('div', { class: 'meta', id: 'dyn-meta' });

    root.append(
      el('div', { class: 'card controls' },
        el('div', { class: 'row' },
          field('Experiment', this.sel.experiment),
          field('Variant', this.sel.variant),
          field('Prompt set', this.sel.prompt_set),
          field('Prompt', el('div', { class: 'prompt-picker' }, this.prevBtn, this.sel.prompt_id, this.nextBtn))),
        el('div', { class: 'row' },
          field('Score', this.modes), this.centered, this.cleaned, this.showPrompt, this.clip)),
      el('div', { class: 'layout-2' },
        el('div', { class: 'card side' }, el('h3', { text: 'Traits & layers' }), this.traitBox,
          el('p', { class: 'hint', text: 'Tick traits to overlay them; click layer chips to overlay layers. Click a legend entry to shade the text by it.' })),
        el('div', { class: 'card main' }, this.meta, this.chartHost, this.legend, this.notes)),
      el('div', { class: 'card' }, this.textHost),
    );
    window.addEventListener('resize', () => { if (this.data) this.renderChart(); });
  }

  // -- state <-> URL -----------------------------------------------------------------------

  params() {
    const s = this.state;
    return {
      experiment: s.experiment, variant: s.variant, prompt_set: s.prompt_set, prompt_id: s.prompt_id,
      mode: s.mode, centered: s.centered ? '1' : '0', cleaned: s.cleaned ? '1' : '0',
      series: s.series ? [...s.series].join(',') : undefined, focus: s.focus || undefined,
      prompt: s.showPrompt ? undefined : '0', clip: s.clip ? undefined : '0',
    };
  }

  async show(params) {
    const s = this.state;
    for (const key of ['experiment', 'variant', 'prompt_set', 'prompt_id']) s[key] = params.get(key) || this.app.shared[key] || null;
    s.mode = ['raw', 'normalized', 'cosine'].includes(params.get('mode')) ? params.get('mode') : s.mode;
    if (params.has('centered')) s.centered = params.get('centered') === '1';
    if (params.has('cleaned')) s.cleaned = params.get('cleaned') === '1';
    if (params.has('prompt')) s.showPrompt = params.get('prompt') !== '0';
    if (params.has('clip')) s.clip = params.get('clip') !== '0';
    if (params.get('series')) s.series = new Set(params.get('series').split(',').filter(Boolean));
    if (params.get('focus')) s.focus = params.get('focus');
    await this.change('experiment', true);
  }

  // Reload everything downstream of the control that changed.
  async change(from, initial = false) {
    const s = this.state;
    const ticket = ++this.ticket;
    const order = ['experiment', 'variant', 'prompt_set', 'prompt_id', 'scores'];
    const start = order.indexOf(from);
    if (!initial && from !== 'scores') s[from] = this.sel[from].value;
    clearError();
    try {
      if (start <= 0) {
        const list = await this.app.experiments();
        s.experiment = fillSelect(this.sel.experiment, list.map((e) => e.name), s.experiment);
      }
      if (start <= 1) {
        const info = await api('variants', { experiment: s.experiment });
        if (ticket !== this.ticket) return;
        this.variants = info.variants;
        // A config.json the store refuses gives no defaults or model names; say which field.
        this.configWarning = info.config_warning || null;
        const names = info.variants.map((v) => v.name);
        s.variant = fillSelect(this.sel.variant, names, names.includes(s.variant) ? s.variant : info.defaults.application);
      }
      if (start <= 2) {
        const sets = (await api('prompt_sets', { experiment: s.experiment, variant: s.variant })).prompt_sets;
        if (ticket !== this.ticket) return;
        const withPrompts = sets.filter((p) => p.n_prompts > 0);
        s.prompt_set = fillSelect(this.sel.prompt_set, withPrompts.map((p) => ({ value: p.name, label: `${p.name} (${p.n_prompts})` })), s.prompt_set);
      }
      if (start <= 3) {
        const { prompts, warnings } = await api('prompts', { experiment: s.experiment, variant: s.variant, prompt_set: s.prompt_set });
        if (ticket !== this.ticket) return;
        this.listWarnings = warnings || [];
        this.promptIds = prompts.map((p) => p.id);
        s.prompt_id = fillSelect(this.sel.prompt_id, prompts.map((p) => ({
          value: p.id, label: p.preview ? `${p.id} — ${p.preview}` : p.id,
        })), s.prompt_id);
      }
      Object.assign(this.app.shared, { experiment: s.experiment, variant: s.variant, prompt_set: s.prompt_set, prompt_id: s.prompt_id });
      if (!s.prompt_id) { this.data = null; this.renderEmpty('No prompts with responses in this prompt set.'); return; }
      const variant = (this.variants || []).find((v) => v.name === s.variant);
      if (s.cleaned && variant && !variant.has_calibration) s.cleaned = false;
      const data = await api('prompt', {
        experiment: s.experiment, variant: s.variant, prompt_set: s.prompt_set, prompt_id: s.prompt_id,
        mode: s.mode, centered: s.centered, cleaned: s.cleaned,
      });
      if (ticket !== this.ticket) return;
      this.data = data;
      this.render();
    } catch (err) {
      if (ticket !== this.ticket) return;
      showError(err.message);
      this.renderEmpty(err.message);
    }
    this.app.writeHash('dynamics', this.params());
  }

  redraw() {
    if (this.data) this.render();
    this.app.writeHash('dynamics', this.params());
  }

  step(delta) {
    if (!this.promptIds || !this.promptIds.length) return;
    const k = this.promptIds.indexOf(this.state.prompt_id);
    const next = this.promptIds[Math.max(0, Math.min(this.promptIds.length - 1, k + delta))];
    if (next === this.state.prompt_id) return;
    this.sel.prompt_id.value = next;
    this.change('prompt_id');
  }

  renderEmpty(message) {
    this.chartHost.replaceChildren(el('p', { class: 'empty', text: message }));
    this.legend.replaceChildren();
    this.textHost.replaceChildren();
    this.traitBox.replaceChildren();
    this.meta.replaceChildren();
  }

  // -- series ------------------------------------------------------------------------------

  allSeries() {
    const out = [];
    this.data.traits.forEach((t, ti) => {
      t.series.forEach((s, li) => {
        out.push({
          key: `${t.trait}@${s.layer}`, trait: t.trait, layer: s.layer, method: s.method,
          color: PALETTE[ti % PALETTE.length], dash: DASHES[li % DASHES.length],
          values: [...s.prompt, ...s.response], src: s, traitInfo: t,
        });
      });
    });
    return out;
  }

  selected(all) {
    const s = this.state;
    // Keys from another prompt set or experiment match nothing here: start from the default.
    if (s.series && s.series.size && ![...s.series].some((k) => all.some((x) => x.key === k))) s.series = null;
    if (!s.series) {
      // Default: every trait at its first layer, which the pipeline lists first (best layer).
      s.series = new Set(this.data.traits.filter((t) => t.series.length).map((t) => `${t.trait}@${t.series[0].layer}`));
    }
    const chosen = all.filter((x) => s.series.has(x.key));
    if (!chosen.some((x) => x.key === s.focus)) s.focus = chosen.length ? chosen[0].key : null;
    return chosen;
  }

  toggleTrait(trait, on) {
    const series = this.state.series;
    const t = this.data.traits.find((x) => x.trait === trait);
    for (const key of [...series]) if (key.startsWith(`${trait}@`)) series.delete(key);
    if (on && t && t.series.length) series.add(`${trait}@${t.series[0].layer}`);
    this.render();
    this.app.writeHash('dynamics', this.params());
  }

  toggleLayer(key) {
    const series = this.state.series;
    if (series.has(key)) series.delete(key); else series.add(key);
    this.render();
    this.app.writeHash('dynamics', this.params());
  }

  // -- rendering ---------------------------------------------------------------------------

  render() {
    const d = this.data;
    const s = this.state;
    if (!d) return;
    this.modes.set(s.mode);
    const allCentered = d.traits.length > 0 && d.traits.every((t) => t.centered_at_source);
    this.centered.input.checked = s.centered || allCentered;
    this.centered.input.disabled = allCentered;
    this.centered.title = allCentered ? 'scores were centered when projected' : 'subtract each vector\'s baseline';
    const variant = (this.variants || []).find((v) => v.name === s.variant);
    const cleanable = Boolean(variant && variant.has_calibration) && (s.cleaned || d.traits.some((t) => t.series.some((x) => x.has_cleaned)));
    this.cleaned.input.checked = s.cleaned;
    this.cleaned.input.disabled = !cleanable;
    const dims = d.calibration ? d.calibration.massive_dims : [];
    // A broken calibration file is named in the notes below; the label says where to look.
    const broken = d.calibration_warning;
    const why = broken ? 'calibration unusable, see the note below' : 'no calibration';
    this.cleaned.querySelector('span').textContent = cleanable ? `clean massive dims [${dims.join(', ')}]` : `clean massive dims (${why})`;
    this.cleaned.title = broken || '';
    this.showPrompt.input.checked = s.showPrompt;
    this.clip.input.checked = s.clip;

    const all = this.allSeries();
    this.chosen = this.selected(all);
    this.renderTraits(all);
    this.renderMeta();
    this.renderChart();
    this.renderLegend();
    this.renderText();
    const notes = [];
    if (d.missing_traits.length) notes.push(`No projection for this prompt: ${d.missing_traits.join(', ')}.`);
    if (d.skipped.length) notes.push(`Not cleaned, hidden: ${d.skipped.map((x) => `${x.trait} L${x.layer}`).join(', ')}.`);
    notes.push(...d.warnings, ...(this.listWarnings || []));
    if (this.configWarning) notes.push(this.configWarning);
    this.notes.replaceChildren(...notes.map((n) => el('p', { text: n })));
  }

  renderTraits(all) {
    const s = this.state;
    this.traitBox.replaceChildren(...this.data.traits.map((t, ti) => {
      const keys = all.filter((x) => x.trait === t.trait);
      const on = keys.some((x) => s.series.has(x.key));
      const box = el('input', { type: 'checkbox', checked: on, 'data-trait': t.trait, onchange: (ev) => this.toggleTrait(t.trait, ev.target.checked) });
      return el('div', { class: 'trait-row' },
        el('label', { class: 'trait-name' }, box, swatch(PALETTE[ti % PALETTE.length]), el('span', { text: t.trait })),
        el('div', { class: 'chips' }, keys.map((x) => el('button', {
          type: 'button', class: 'chip', 'aria-pressed': String(s.series.has(x.key)), 'data-key': x.key,
          title: `${x.method}, layer ${x.layer}, selected by ${x.src.selection_source || '?'}`,
          text: `L${x.layer}`, onclick: () => this.toggleLayer(x.key),
        }))));
    }));
  }

  renderMeta() {
    const r = this.data.response;
    const bits = [
      r.inference_model && `model ${r.inference_model}`,
      `${r.prompt_end} prompt + ${r.tokens.length - r.prompt_end} response tokens`,
      r.prompt_note && `note: ${r.prompt_note}`,
      r.capture_date && `captured ${r.capture_date.slice(0, 10)}`,
    ].filter(Boolean);
    this.meta.replaceChildren(el('h2', { text: `Prompt ${this.data.prompt_id}` }), el('span', { text: bits.join(' · ') }));
  }

  renderChart() {
    const d = this.data;
    const s = this.state;
    const offset = s.showPrompt ? 0 : d.response.prompt_end;
    const n = d.response.tokens.length - offset;
    const series = this.chosen.map((x) => ({
      key: x.key, color: x.color, dash: x.dash, values: x.values.slice(offset),
      width: x.key === s.focus ? 2.6 : 1.6,
    }));
    const ySuffix = `${s.centered ? ', centered' : ''}${s.cleaned ? ', cleaned' : ''}`;
    this.chart = tokenChart(this.chartHost, {
      series, n, promptEnd: s.showPrompt ? d.response.prompt_end : 0, clip: s.clip,
      yLabel: `${MODE_LABELS[s.mode]}${ySuffix}`,
      xLabel: s.showPrompt ? 'token index (prompt → response)' : 'response token index',
      markers: s.showPrompt ? [{ at: d.response.prompt_end, label: 'response starts', class: 'response-start' }] : [],
      onHover: (i, cx, cy) => this.hover(i === null ? null : i + offset, cx, cy, false),
      attrs: { 'data-mode': s.mode, 'data-centered': s.centered ? '1' : '0', 'data-cleaned': s.cleaned ? '1' : '0', 'data-series': String(series.length) },
    });
    this.chartOffset = offset;
    if (!series.length) this.chartHost.append(el('p', { class: 'empty', text: 'Tick a trait to plot it.' }));
  }

  renderLegend() {
    const s = this.state;
    this.legend.replaceChildren(...this.chosen.map((x) => el('button', {
      type: 'button', class: `legend-item${x.key === s.focus ? ' focus' : ''}`, 'data-key': x.key,
      title: 'shade the text by this series',
      onclick: () => { s.focus = x.key; this.render(); this.app.writeHash('dynamics', this.params()); },
    }, swatch(x.color, x.dash), el('span', { text: `${x.trait} · L${x.layer}` }),
    el('span', { class: 'muted', text: ` ${x.method}${x.src.selection_source ? `, ${x.src.selection_source}` : ''}` }))));
  }

  renderText() {
    const d = this.data;
    const focus = this.chosen.find((x) => x.key === this.state.focus);
    const tokens = d.response.tokens;
    const end = d.response.prompt_end;
    const values = focus ? focus.values : null;
    const respScale = values ? robustMaxAbs(values.slice(end)) : 0;
    const promptScale = values ? robustMaxAbs(values.slice(0, end)) : 0;
    const hover = (i, cx, cy) => this.hover(i, cx, cy, true);
    const label = focus ? `shaded by ${focus.trait} · L${focus.layer}` : 'no series selected';
    this.textHost.replaceChildren(
      el('div', { class: 'text-head' }, el('h3', { text: 'Response' }), focus ? shadeLegend(respScale, label) : el('span', { class: 'muted', text: label })),
      el('div', { id: 'dyn-response' }, tokenStrip(tokens, end, tokens.length, values, respScale, hover)),
      el('details', { class: 'prompt-text' },
        el('summary', { text: `Prompt (${end} tokens, chat-formatted; own shading scale ±${fmt(promptScale, 3)})` }),
        el('div', { id: 'dyn-prompt-tokens' }, tokenStrip(tokens, 0, end, values, promptScale, hover))),
    );
  }

  hover(i, cx, cy, fromText) {
    if (i === null) { hideTooltip(); if (fromText && this.chart) this.chart.highlight(null); return; }
    const d = this.data;
    const end = d.response.prompt_end;
    const token = d.response.tokens[i];
    if (fromText && this.chart) this.chart.highlight(i - this.chartOffset);
    const where = i < end ? `prompt token ${i}` : `response token ${i - end}`;
    showTooltip(cx, cy, tokenLabel(token), `#${i} · ${where}`, this.chosen.map((x) => ({
      color: x.color, dash: x.dash, label: `${x.trait} L${x.layer}`, value: fmt(x.values[i], 6),
    })));
  }
}
