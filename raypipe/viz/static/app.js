// Dashboard entry point: hash routing between the three views and state shared between them.

import { api, hideTooltip, showError } from './common.js';
import { DynamicsView } from './dynamics.js';
import { ModelsView } from './models.js';
import { OverviewView } from './overview.js';

const VIEWS = { dynamics: DynamicsView, models: ModelsView, overview: OverviewView };

function query(params) {
  const out = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== '') out.set(key, value);
  }
  return out.toString();
}

const app = {
  // Experiment, variant, prompt set and prompt follow the user from one view to the next.
  shared: {},
  views: {},
  listing: null,

  experiments() {
    if (!this.listing) {
      this.listing = api('experiments').then((r) => {
        const usable = r.experiments.filter((e) => !e.error && e.variants.length);
        if (!usable.length) throw new Error('no experiment with inference results under experiments/');
        return usable;
      }).catch((err) => { this.listing = null; throw err; });
    }
    return this.listing;
  },

  // The URL always reflects the view, so a view can be bookmarked or shared as a link.
  writeHash(view, params) {
    if (this.current !== view) return;
    history.replaceState(null, '', `#/${view}?${query(params)}`);
  },

  go(view, params) { window.location.hash = `#/${view}?${query(params)}`; },

  async route() {
    hideTooltip();
    const hash = window.location.hash.replace(/^#\/?/, '');
    const [name, qs] = hash.split('?');
    const view = VIEWS[name] ? name : 'dynamics';
    this.current = view;
    for (const [key, section] of Object.entries(this.sections)) section.hidden = key !== view;
    for (const link of document.querySelectorAll('nav a')) {
      link.setAttribute('aria-current', link.dataset.view === view ? 'page' : 'false');
    }
    if (!this.views[view]) this.views[view] = new VIEWS[view](this.sections[view], this);
    document.body.dataset.view = view;
    try {
      await this.views[view].show(new URLSearchParams(qs || ''));
    } catch (err) {
      showError(err.message);
    }
  },
};

window.addEventListener('DOMContentLoaded', () => {
  app.sections = {
    dynamics: document.getElementById('view-dynamics'),
    models: document.getElementById('view-models'),
    overview: document.getElementById('view-overview'),
  };
  window.addEventListener('hashchange', () => app.route());
  document.addEventListener('scroll', hideTooltip, { passive: true });
  app.route();
});
