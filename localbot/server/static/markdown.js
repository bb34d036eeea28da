"use strict";
// A small Markdown renderer for replies: fenced code blocks, inline code, bold and italics,
// headings, lists, quotes, rules and http(s) links. Enough for chat, and safe by construction:
// every piece of text is HTML-escaped before any markup is added around it, and links are
// only http(s). Not CommonMark: nested lists, tables and images are shown as plain text.
(function () {
  function escapeHtml(text) {
    return text
      .replace(/&/g, "&amp;")
      .replace(/</g, "&lt;")
      .replace(/>/g, "&gt;")
      .replace(/"/g, "&quot;")
      .replace(/'/g, "&#39;");
  }

  // Inline markup on raw text: code spans are cut out first so nothing inside them changes.
  function inline(raw) {
    const codes = [];
    let text = escapeHtml(raw).replace(/`([^`\n]+)`/g, function (_, code) {
      codes.push(code);
      return "\u0000" + (codes.length - 1) + "\u0000";
    });
    text = text
      .replace(/\*\*([^*\n]+)\*\*/g, "<strong>$1</strong>")
      .replace(/__([^_\n]+)__/g, "<strong>$1</strong>")
      .replace(/(^|[^*\w])\*([^*\s][^*\n]*?)\*(?!\w)/g, "$1<em>$2</em>")
      .replace(/(^|[^_\w])_([^_\s][^_\n]*?)_(?!\w)/g, "$1<em>$2</em>")
      .replace(
        /\[([^\]\n]+)\]\((https?:\/\/[^\s)]+)\)/g,
        '<a href="$2" target="_blank" rel="noopener noreferrer">$1</a>'
      );
    return text
      .replace(/\u0000(\d+)\u0000/g, function (_, i) { return "<code>" + codes[+i] + "</code>"; })
      .replace(/\n/g, "<br>");
  }

  const FENCE = /^\s*(```|~~~)\s*([\w+#.-]*)/;
  const HEADING = /^(#{1,6})\s+(.*)$/;
  const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
  const QUOTE = /^\s*>\s?(.*)$/;
  const BULLET = /^\s*[-*+]\s+(.*)$/;
  const NUMBER = /^\s*\d+[.)]\s+(.*)$/;

  function render(source) {
    const lines = String(source).replace(/\r\n?/g, "\n").split("\n");
    const out = [];
    let para = [];
    const flush = function () {
      if (para.length) out.push("<p>" + inline(para.join("\n")) + "</p>");
      para = [];
    };
    // Consecutive lines matching `pattern`, as their captured text.
    const collect = function (start, pattern) {
      const items = [];
      let j = start;
      while (j < lines.length && pattern.test(lines[j])) {
        items.push(lines[j].match(pattern)[1]);
        j += 1;
      }
      return [items, j];
    };
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      const fence = line.match(FENCE);
      if (fence) {
        flush();
        const code = [];
        i += 1;
        // An unclosed fence (a reply still streaming) runs to the end.
        while (i < lines.length && !lines[i].trim().startsWith(fence[1])) code.push(lines[i++]);
        i += 1;
        const lang = fence[2] ? ' class="language-' + escapeHtml(fence[2]) + '"' : "";
        out.push("<pre><code" + lang + ">" + escapeHtml(code.join("\n")) + "</code></pre>");
        continue;
      }
      let m;
      if ((m = line.match(HEADING))) {
        flush();
        const level = m[1].length;
        out.push("<h" + level + ">" + inline(m[2]) + "</h" + level + ">");
        i += 1;
      } else if (RULE.test(line)) {
        flush();
        out.push("<hr>");
        i += 1;
      } else if (QUOTE.test(line)) {
        flush();
        const [items, next] = collect(i, QUOTE);
        out.push("<blockquote>" + inline(items.join("\n")) + "</blockquote>");
        i = next;
      } else if (BULLET.test(line) || NUMBER.test(line)) {
        flush();
        const pattern = BULLET.test(line) ? BULLET : NUMBER;
        const tag = pattern === BULLET ? "ul" : "ol";
        const [items, next] = collect(i, pattern);
        out.push("<" + tag + ">" + items.map(function (t) { return "<li>" + inline(t) + "</li>"; }).join("") + "</" + tag + ">");
        i = next;
      } else if (!line.trim()) {
        flush();
        i += 1;
      } else {
        para.push(line);
        i += 1;
      }
    }
    flush();
    return out.join("");
  }

  window.renderMarkdown = render;
  window.escapeHtml = escapeHtml;
})();
