// Charts with plotly.js, served by the app from the `plotly` wheel (/vendor/plotly.min.js) and
// loaded on the first page that draws one.

let loading = null;
export function loadPlotly() {
  if (window.Plotly) return Promise.resolve(window.Plotly);
  loading ||= new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = "/vendor/plotly.min.js";
    s.onload = () => resolve(window.Plotly);
    s.onerror = () => { loading = null; reject(new Error("the charting library (/vendor/plotly.min.js) did not load")); };
    document.head.append(s);
  });
  return loading;
}

const COLORS = ["#1d5fd1", "#e2711d", "#13804b", "#b4235a", "#6b46c1", "#0f8b8d", "#8a6d00", "#5d6677"];

/** Draw (or redraw in place) line series {name, x, y} into el, one y axis, x = step. */
export async function lineChart(el, series, { title = "", xTitle = "step" } = {}) {
  const Plotly = await loadPlotly();
  const data = series.map((s, i) => ({
    type: "scatter", mode: s.x.length <= 40 ? "lines+markers" : "lines", name: s.name, x: s.x, y: s.y,
    line: { width: 2, color: COLORS[i % COLORS.length] }, marker: { size: 5 },
    hovertemplate: `${s.name.replace(/%/g, "%%")}<br>${xTitle} %{x}<br>%{y:.4g}<extra></extra>`,
  }));
  const layout = {
    title: { text: title, font: { size: 13 }, x: 0.02, xanchor: "left" },
    margin: { l: 52, r: 14, t: 34, b: 40 }, height: 250, autosize: true,
    xaxis: { title: { text: xTitle, font: { size: 11 } }, gridcolor: "#eef0f3", zeroline: false },
    yaxis: { gridcolor: "#eef0f3", zeroline: false },
    showlegend: series.length > 1,
    paper_bgcolor: "rgba(0,0,0,0)", plot_bgcolor: "rgba(0,0,0,0)",
    font: { family: "system-ui, sans-serif", size: 11, color: "#39404c" },
  };
  if (series.length > 1) {
    // the legend sits at the bottom of the figure (container coordinates) and pushes the plot up as it grows,
    // and the x axis makes room for its ticks and title above it, however many series the legend names
    Object.assign(layout, {
      height: 250 + 18 * (series.length - 1),
      margin: { ...layout.margin, autoexpand: true },
      legend: { orientation: "h", yref: "container", y: 0, yanchor: "bottom", x: 0, xanchor: "left", font: { size: 11 } },
    });
    Object.assign(layout.xaxis, { automargin: true, title: { ...layout.xaxis.title, standoff: 6 } });
  }
  await Plotly.react(el, data, layout, { responsive: true, displaylogo: false,
    modeBarButtonsToRemove: ["lasso2d", "select2d", "autoScale2d"] });
  const last = series.map((s) => s.y.length ? `${s.name} ${Number(s.y[s.y.length - 1]).toPrecision(4)} at ${xTitle} ${s.x[s.x.length - 1]}` : "").filter(Boolean);
  el.setAttribute("aria-label", `Chart of ${title}: ${last.join("; ") || "no points yet"}`);
}

export function purge(el) { if (window.Plotly && el) window.Plotly.purge(el); }
