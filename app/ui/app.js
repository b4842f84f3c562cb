// The dashboard: one Alpine.js component over the service's public JSON API (the same routes and
// API keys as any client; the key lives in this browser tab's sessionStorage). Charts are Chart.js.

const GALLERY_PAGE = 24;
const TABLE_PAGE = 50;
const ACTIVE = ["queued", "running", "cancelling"];
const REVIEW_SETS = [
  ["s_star", "S* (Phase I's training set)"],
  ["clean_model1", "clean set, model 1"],
  ["clean_model2", "clean set, model 2"],
  ["rejected_model1", "rejected, model 1"],
  ["rejected_model2", "rejected, model 2"],
  ["labelled", "labelled by you"],
  ["all", "all images"],
];
// Chart.js objects stay outside Alpine's reactive proxies (which they do not survive).
const charts = {};

function formatSeconds(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.max(0, Math.round(seconds));
  return s >= 60 ? `${Math.floor(s / 60)}m ${s % 60}s` : `${s}s`;
}

// Each training loss from its first epoch to its last ("l1 <first> → <last>"): a model that starts at
// zero-shot may fit its labels untrained, so the fall of its losses is what shows training.
function formatLosses(first, last) {
  return Object.entries(last || {}).filter(([, value]) => value !== null)
    .map(([name, value]) => {
      const start = (first || {})[name];
      return start === null || start === undefined ? `${name} ${value.toFixed(3)}`
        : `${name} ${start.toFixed(3)} → ${value.toFixed(3)}`;
    }).join(", ");
}

// A stage's fit (coft.convergence): null when it had nothing to train on.
function fitted(fit) {
  return fit.images === 0 ? null : fit.agreement >= fit.threshold;
}

function dashboard() {
  return {
    key: sessionStorage.getItem("coft-api-key") || "",
    keyInput: "",
    route: { view: "datasets", id: null },
    error: null,
    notice: null,
    datasets: [],
    jobs: [],
    job: null,
    upload: { file: null, progress: null, busy: false },
    models: [],
    form: { dataset_id: "", eval_dataset_id: "", class_names: "", method: "coft", model: "", config: "" },
    reviewSets: REVIEW_SETS,
    gallery: { set: "s_star", label: "", offset: 0, total: 0, items: [] },
    thumbs: {}, // image index -> object URL
    corrections: {}, // image path -> the class the user says it is
    table: { label: "", min: 0, max: 1, offset: 0, total: 0, items: [] },
    timer: null,
    formatSeconds,
    formatLosses,
    fitted,

    init() {
      window.addEventListener("hashchange", () => this.navigate());
      if (this.key) this.navigate();
    },

    saveKey() {
      this.key = this.keyInput.trim();
      sessionStorage.setItem("coft-api-key", this.key);
      this.keyInput = "";
      this.navigate();
    },

    signOut() {
      sessionStorage.removeItem("coft-api-key");
      this.key = "";
      this.stopPolling();
    },

    // -- the API ---------------------------------------------------------------------------

    async api(path, options = {}) {
      const headers = { ...(options.headers || {}), Authorization: `Bearer ${this.key}` };
      const response = await fetch(path, { ...options, headers });
      if (!response.ok) {
        let problem = {};
        try { problem = await response.json(); } catch { /* not problem+json */ }
        this.error = problem.detail || problem.title || `HTTP ${response.status}`;
        if (response.status === 401) this.signOut();
        throw new Error(this.error);
      }
      return response;
    },

    async json(path, options) {
      return (await this.api(path, options)).json();
    },

    // -- routes: #/datasets, #/jobs, #/jobs/{id} ------------------------------------------------

    navigate() {
      const [view, id] = location.hash.replace(/^#\/?/, "").split("/");
      this.route = { view: view || "datasets", id: id || null };
      this.error = null;
      this.notice = null;
      this.stopPolling();
      if (this.route.view === "jobs" && this.route.id) return this.openJob(this.route.id);
      if (this.route.view === "jobs") return this.loadJobs();
      return this.loadDatasets();
    },

    stopPolling() {
      clearInterval(this.timer);
      this.timer = null;
    },

    poll(refresh) {
      this.stopPolling();
      this.timer = setInterval(() => refresh().catch(() => this.stopPolling()), 1000);
    },

    // -- datasets --------------------------------------------------------------------------

    async loadDatasets() {
      this.datasets = (await this.json("/v1/datasets?limit=100")).items;
      if (!this.models.length) this.models = await this.json("/v1/models");
      const ready = this.datasets.filter((d) => d.status === "ready");
      if (!this.form.dataset_id && ready.length) this.form.dataset_id = ready[0].id;
      if (this.datasets.some((d) => d.status === "validating")) this.poll(() => this.loadDatasets());
      else this.stopPolling();
    },

    uploadDataset() {
      const file = this.$refs.archive.files[0];
      if (!file) return;
      const body = new FormData();
      body.append("file", file);
      const request = new XMLHttpRequest();
      request.open("POST", "/v1/datasets");
      request.setRequestHeader("Authorization", `Bearer ${this.key}`);
      request.upload.onprogress = (event) => {
        if (event.lengthComputable) this.upload.progress = event.loaded / event.total;
      };
      request.onload = () => {
        this.upload.busy = false;
        const answer = JSON.parse(request.responseText || "{}");
        if (request.status >= 400) {
          this.error = answer.detail || answer.title || `HTTP ${request.status}`;
        } else {
          this.error = null;
          this.upload.progress = 1;
          this.form.dataset_id = answer.status === "ready" ? answer.id : this.form.dataset_id;
          this.notice = `Uploaded ${answer.filename}: ${answer.num_images} images (${answer.status})`;
        }
        this.loadDatasets();
      };
      request.onerror = () => { this.upload.busy = false; this.error = "the upload failed (network)"; };
      this.upload = { file: file.name, progress: 0, busy: true };
      request.send(body);
    },

    async startJob() {
      const body = {
        dataset_id: this.form.dataset_id,
        class_names: this.form.class_names.split(/[,\n]/).map((s) => s.trim()).filter(Boolean),
        method: this.form.method,
      };
      if (this.form.eval_dataset_id) body.eval_dataset_id = this.form.eval_dataset_id;
      if (this.form.model) body.backbone = { model: this.form.model };
      if (this.form.config.trim()) {
        try { body.config = JSON.parse(this.form.config); } catch (e) { this.error = `config is not JSON: ${e.message}`; return; }
      }
      await this.createJob(body);
    },

    async createJob(body) {
      const job = await this.json("/v1/jobs", {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
      });
      location.hash = `#/jobs/${job.id}`;
    },

    // -- jobs ------------------------------------------------------------------------------

    async loadJobs() {
      this.jobs = (await this.json("/v1/jobs?limit=100")).items;
      if (this.jobs.some((j) => ACTIVE.includes(j.status))) {
        if (!this.timer) this.poll(() => this.loadJobs());
      } else this.stopPolling();
    },

    async openJob(id) {
      this.job = null;
      for (const url of Object.values(this.thumbs)) URL.revokeObjectURL(url);
      this.thumbs = {};
      this.corrections = {};
      this.gallery = { set: "s_star", label: "", offset: 0, total: 0, items: [] };
      this.table = { label: "", min: 0, max: 1, offset: 0, total: 0, items: [] };
      await this.refreshJob(id);
      if (this.job && ACTIVE.includes(this.job.status)) this.poll(() => this.refreshJob(id));
    },

    async refreshJob(id) {
      const job = await this.json(`/v1/jobs/${id}`);
      const finishedNow = this.job && ACTIVE.includes(this.job.status) && !ACTIVE.includes(job.status);
      this.job = job;
      if (!ACTIVE.includes(job.status)) this.stopPolling();
      if (job.status === "succeeded" && (finishedNow || !this.gallery.items.length)) await this.showResults();
    },

    async cancelJob() {
      this.job = await this.json(`/v1/jobs/${this.job.id}/cancel`, { method: "POST" });
    },

    get active() {
      return this.job !== null && ACTIVE.includes(this.job.status);
    },

    get reviewable() {
      return this.job !== null && this.job.method !== "predict";
    },

    async showResults() {
      if (!this.reviewable) this.gallery.set = "all";
      else if (this.job.method === "zero-shot") this.gallery.set = "s_star";
      await Promise.all([this.loadGallery(), this.loadTable()]);
      this.$nextTick(() => this.drawCharts());
    },

    // -- the gallery: what the method did, per class -----------------------------------------

    query(params) {
      const search = new URLSearchParams();
      for (const [name, value] of Object.entries(params)) if (value !== "" && value !== null) search.set(name, value);
      return search.toString();
    },

    async loadGallery(offset = this.gallery.offset) {
      const g = this.gallery;
      const asked = (g.asked = (g.asked || 0) + 1); // filters changed quickly: only the last answer counts
      const page = await this.json(`/v1/jobs/${this.job.id}/predictions?${this.query({
        set: g.set, label: g.label, offset, limit: GALLERY_PAGE })}`);
      if (asked !== g.asked) return;
      g.offset = offset;
      g.items = page.items;
      g.total = page.total;
      for (const item of page.items) this.loadThumbnail(item.index);
    },

    async loadThumbnail(index) {
      if (index === null || index === undefined || this.thumbs[index]) return;
      const response = await this.api(`/v1/datasets/${this.job.dataset_id}/images/${index}/thumbnail?size=128`);
      this.thumbs[index] = URL.createObjectURL(await response.blob());
    },

    galleryFilter() {
      this.loadGallery(0);
    },

    galleryPage(step) {
      const offset = this.gallery.offset + step * GALLERY_PAGE;
      if (offset >= 0 && offset < this.gallery.total) this.loadGallery(offset);
    },

    caption(item) {
      const parts = [];
      if (item.zero_shot_label) parts.push(`zero-shot: ${item.zero_shot_label}`);
      (item.model_labels || []).forEach((label, i) => {
        parts.push(`model ${i + 1}: ${label}${item.clean && item.clean[i] ? " ✓" : " ✗"}`);
      });
      parts.push(`final: ${item.label} (${(item.probability * 100).toFixed(0)}%)`);
      return parts;
    },

    // -- steering: corrected labels start a child job ------------------------------------------

    correct(item, label) {
      if (label) this.corrections[item.name] = label;
      else delete this.corrections[item.name];
    },

    get correctionCount() {
      return Object.keys(this.corrections).length;
    },

    async startChild() {
      const j = this.job;
      const body = {
        dataset_id: j.dataset_id, class_names: j.class_names, method: j.method === "zero-shot" ? "coft" : j.method,
        backbone: j.backbone, config: j.config, parent_job_id: j.id,
        labels: { ...(j.labels || {}), ...this.corrections },
      };
      if (j.eval_dataset_id) body.eval_dataset_id = j.eval_dataset_id;
      await this.createJob(body);
    },

    // -- predictions: filter by class and confidence, export as CSV ------------------------------

    tableParams() {
      const t = this.table;
      return { label: t.label, min_probability: t.min, max_probability: t.max };
    },

    async loadTable(offset = this.table.offset) {
      const asked = (this.table.asked = (this.table.asked || 0) + 1);
      const page = await this.json(`/v1/jobs/${this.job.id}/predictions?${this.query({
        ...this.tableParams(), offset, limit: TABLE_PAGE })}`);
      if (asked !== this.table.asked) return;
      this.table.offset = offset;
      this.table.items = page.items;
      this.table.total = page.total;
    },

    tableFilter() {
      this.loadTable(0);
    },

    tablePage(step) {
      const offset = this.table.offset + step * TABLE_PAGE;
      if (offset >= 0 && offset < this.table.total) this.loadTable(offset);
    },

    async exportCsv() {
      const response = await this.api(`/v1/jobs/${this.job.id}/predictions/export?${this.query({
        ...this.tableParams(), format: "csv" })}`);
      const link = document.createElement("a");
      link.href = URL.createObjectURL(await response.blob());
      link.download = `${this.job.id}-predictions.csv`;
      link.click();
    },

    // -- charts ------------------------------------------------------------------------------

    drawCharts() {
      for (const name of Object.keys(charts)) { charts[name].destroy(); delete charts[name]; }
      const m = this.job.metrics || {};
      const draw = (name, config) => {
        const canvas = this.$refs[name];
        if (canvas) charts[name] = new Chart(canvas, { ...config, options: { animation: false, ...config.options } });
      };
      if (m.zero_shot_class_counts && m.final_class_counts) {
        const classes = this.job.class_names;
        draw("counts", { type: "bar", data: { labels: classes, datasets: [
          { label: "zero-shot", data: classes.map((c) => m.zero_shot_class_counts[c] || 0) },
          ...(m.s_star_class_counts ? [{ label: "S*", data: classes.map((c) => m.s_star_class_counts[c] || 0) }] : []),
          { label: "final", data: classes.map((c) => m.final_class_counts[c] || 0) },
        ] } });
      }
      const filter = [["agreement", "agreement"], ["clean_fraction_model1", "clean fraction, model 1"],
        ["clean_fraction_model2", "clean fraction, model 2"], ["mean_p_clean_model1", "mean p_clean, model 1"],
        ["mean_p_clean_model2", "mean p_clean, model 2"]].filter(([key]) => key in m);
      if (filter.length) {
        draw("filter", { type: "bar", data: { labels: filter.map(([, label]) => label),
          datasets: [{ label: "fraction", data: filter.map(([key]) => m[key]) }] },
          options: { scales: { y: { min: 0, max: 1 } } } });
      }
      const curves = [];
      for (const [key, history] of Object.entries(m)) {
        if (!key.endsWith("_losses") || !Array.isArray(history) || !history.length) continue;
        for (const term of Object.keys(history[0]).filter((k) => k !== "epoch")) {
          curves.push({ label: `${key.replace(/_losses$/, "")} ${term}`,
            data: history.map((entry) => ({ x: entry.epoch, y: entry[term] })) });
        }
      }
      if (curves.length) {
        draw("losses", { type: "line", data: { datasets: curves },
          options: { parsing: true, scales: { x: { type: "linear", title: { display: true, text: "epoch" } } } } });
      }
      if (m.accuracy) {
        const stages = Object.keys(m.accuracy);
        draw("accuracy", { type: "bar", data: { labels: stages,
          datasets: [{ label: "accuracy on the evaluation set", data: stages.map((s) => m.accuracy[s]) }] },
          options: { scales: { y: { min: 0, max: 1 } } } });
      }
    },
  };
}
