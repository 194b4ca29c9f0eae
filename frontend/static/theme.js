// Light or dark: the system's setting unless the reader picked one with the toggle, which is
// kept in localStorage. The page's colours and the code highlighting's follow `data-theme`.

const KEY = "chat-theme";
const dark = window.matchMedia("(prefers-color-scheme: dark)");

function apply(theme) {
  document.documentElement.dataset.theme = theme;
  const darkCode = document.getElementById("code-dark");
  const lightCode = document.getElementById("code-light");
  if (darkCode && lightCode) {
    darkCode.disabled = theme !== "dark";
    lightCode.disabled = theme === "dark";
  }
}

function current() {
  return localStorage.getItem(KEY) || (dark.matches ? "dark" : "light");
}

/** Apply the theme, follow the system's changes, and let `toggle` switch it. */
export function setUpTheme(toggle) {
  const update = () => {
    const theme = current();
    apply(theme);
    if (toggle) {
      const other = theme === "dark" ? "light" : "dark";
      toggle.setAttribute("aria-label", `Use the ${other} theme`);
      toggle.title = `Use the ${other} theme`;
      toggle.setAttribute("aria-pressed", theme === "dark" ? "true" : "false");
    }
  };
  dark.addEventListener("change", update);
  toggle?.addEventListener("click", () => {
    localStorage.setItem(KEY, current() === "dark" ? "light" : "dark");
    update();
  });
  update();
}
