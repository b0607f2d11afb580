// Leave empty filters out of a search's address (and so out of the audit log's query column).
document.addEventListener("submit", function (event) {
  var form = event.target;
  if (form.method.toLowerCase() !== "get") return;
  Array.prototype.forEach.call(form.elements, function (field) {
    if (field.name && field.value === "") field.disabled = true;
  });
});
// A page restored by the back button gets its fields back.
window.addEventListener("pageshow", function () {
  Array.prototype.forEach.call(document.querySelectorAll("form [disabled]"), function (field) {
    field.disabled = false;
  });
});
