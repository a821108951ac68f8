/* sseviews.js: a small EventSource wrapper for sseviews streams. Plain JavaScript,
 * no build step. See docs/browser-client.md.
 *
 *   const stream = sseviews.connect("/stream", {tokenUrl: "/stream-token"});
 *   stream.on("chat", (data, event) => ...);
 *   stream.onreset = (info) => location.reload();
 *
 * - Every new EventSource resumes with ?lastEventId=<last id seen>.
 * - When the browser gives up (a refusal such as 401) it reconnects itself, with
 *   exponential backoff and jitter, fetching a fresh token first.
 * - When the stream ends with "sseviews.expired" it fetches a fresh token and
 *   reconnects at once.
 * - When the stream ends with "sseviews.error" (the server's events() raised) it
 *   reconnects after a backoff with jitter that doubles with each error in a row,
 *   from minDelay up to maxDelay, instead of the browser's fixed retry delay.
 * - "sseviews.reset" (the history cannot resume from your last id) calls onreset.
 */
(function (root) {
  "use strict";

  function connect(url, options) {
    options = options || {};
    var minDelay = options.minDelay || 500;
    var maxDelay = options.maxDelay || 30000;
    var listeners = {};
    var source = null;
    var timer = null;
    var failures = 0; // refusals in a row (the browser gave up)
    var errors = 0; // streams in a row that ended with sseviews.error
    var openedAt = 0;
    var closed = false;
    var stream = {
      lastEventId: options.lastEventId || "",
      token: options.token || "",
      source: null,
      onopen: null,
      onerror: null,
      onreset: null,
      on: on,
      close: close,
    };

    function on(name, callback) {
      (listeners[name] = listeners[name] || []).push(callback);
      if (source && name !== "message") source.addEventListener(name, dispatch);
      return stream;
    }

    function dispatch(event) {
      if (event.lastEventId) stream.lastEventId = event.lastEventId;
      var data = event.data;
      try {
        data = JSON.parse(data);
      } catch (e) {
        /* not JSON: hand over the text */
      }
      var callbacks = listeners[event.type] || [];
      for (var i = 0; i < callbacks.length; i++) callbacks[i](data, event);
      if (event.type === "sseviews.reset" && stream.onreset) stream.onreset(data, event);
    }

    function address() {
      var target = new URL(url, location.href);
      if (stream.token) target.searchParams.set("token", stream.token);
      if (stream.lastEventId) target.searchParams.set("lastEventId", stream.lastEventId);
      return target.href;
    }

    function refresh() {
      if (!options.tokenUrl) return Promise.resolve();
      return fetch(options.tokenUrl, { credentials: "same-origin", cache: "no-store" })
        .then(function (response) {
          if (!response.ok) throw new Error("token request failed: " + response.status);
          return response.text();
        })
        .then(function (text) {
          var token = text;
          try {
            token = JSON.parse(text).token;
          } catch (e) {
            /* a plain-text token */
          }
          stream.token = token || "";
        });
    }

    function open() {
      timer = null;
      if (closed) return;
      var es = (source = stream.source = new EventSource(address(), {
        withCredentials: !!options.withCredentials,
      }));
      es.onopen = function (event) {
        failures = 0;
        openedAt = Date.now();
        if (stream.onopen) stream.onopen(event);
      };
      es.onmessage = dispatch;
      es.onerror = function (event) {
        if (stream.onerror) stream.onerror(event);
        // CONNECTING: the browser reconnects by itself, with its Last-Event-ID.
        // CLOSED: it gave up (a status other than 200, e.g. 401): we take over.
        if (es.readyState === 2 && source === es) restart(backoff(failures++));
      };
      es.addEventListener("sseviews.expired", function () {
        if (source === es) restart(0);
      });
      es.addEventListener("sseviews.error", function () {
        if (source !== es) return;
        // A stream that ran for a while before it failed starts the count again.
        if (Date.now() - openedAt > maxDelay) errors = 0;
        restart(backoff(errors++));
      });
      for (var name in listeners) {
        if (name !== "message") es.addEventListener(name, dispatch);
      }
      if (!listeners["sseviews.reset"]) es.addEventListener("sseviews.reset", dispatch);
    }

    function backoff(count) {
      var delay = Math.min(maxDelay, minDelay * Math.pow(2, count));
      return delay / 2 + Math.random() * delay; // jitter: 0.5x to 1.5x
    }

    function restart(delay) {
      if (source) source.close();
      source = null;
      if (closed || timer) return;
      timer = setTimeout(function () {
        refresh().then(open, function () {
          timer = null;
          restart(backoff(failures++));
        });
      }, delay);
    }

    if (options.tokenUrl && !stream.token) {
      timer = -1;
      refresh().then(open, function () {
        timer = null;
        restart(backoff(failures++));
      });
    } else {
      open();
    }

    function close() {
      closed = true;
      if (timer && timer !== -1) clearTimeout(timer);
      if (source) source.close();
      source = null;
    }

    return stream;
  }

  root.sseviews = { connect: connect };
})(typeof self !== "undefined" ? self : this);
